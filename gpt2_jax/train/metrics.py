"""Training metrics out: progress bar, metrics.jsonl, TensorBoard and (optionally) wandb.

On a gs:// workdir (object stores have no append) metrics.jsonl is kept in memory and uploaded
whole, at most every UPLOAD_EVERY_S seconds, at every `flush` (the loop flushes when it saves a
checkpoint, so the rows up to a checkpoint are stored with it) and at close; TensorBoard writes
its event files into a local temporary folder that is uploaded the same way. Nothing is written
to a local `gs:` folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

from gpt2_jax.interop import paths

UPLOAD_EVERY_S = 60.0  # each upload rewrites the whole object: rare, plus every checkpoint and the end


class MetricsWriter:
    """Writes rows to metrics.jsonl (one JSON object per line, appended, flushed per row),
    TensorBoard (events under `workdir`) and wandb (if `wandb_project`), and shows a tqdm
    progress bar. Only the process given `enabled=True` (process 0) writes anything."""

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        start_step: int = 0,
        drop_after: int | None = None,
        enabled: bool = True,
        progress: bool = True,
        wandb_project: str = "",
        wandb_name: str = "",
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self._jsonl = self._tb = self._wandb = self._bar = None
        self._remote = self._local_dir = None
        if not enabled:
            return
        path = paths.join(workdir, "metrics.jsonl")
        if paths.is_remote(workdir):
            self._remote = _RemoteFiles(workdir, path, drop_after)
            self._jsonl, self._local_dir = self._remote, self._remote.local_dir
        else:
            os.makedirs(workdir, exist_ok=True)
            if drop_after is not None:  # a (re)started run: earlier rows past its start are stale
                _drop_rows_after(path, drop_after)
            self._jsonl, self._local_dir = open(path, "a", buffering=1), workdir
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=self._local_dir)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=wandb_name or None, config=run_config,
                                     dir=self._local_dir)  # fmt: skip
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)

    def write(self, step: int, row: dict[str, Any], prefix: str) -> None:
        """One row: `step` plus scalar metrics (None values are left out); `prefix` names the
        TensorBoard / wandb group ('train' or 'eval')."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items() if v is not None}}
        self._jsonl.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for k, v in scalars.items():
            self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)
        if self._remote is not None:
            self._remote.upload(self._tb, force=False)
        if prefix == "train" and self._bar is not None:
            self._bar.set_postfix_str(_postfix(row), refresh=False)
        elif prefix == "train":  # no progress bar (logs, several processes): a line per logged step
            print(f"step {step}: {_postfix(row)}", flush=True)

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        self._tb.add_text(tag, text, step)
        if self._wandb is not None:
            self._wandb.log({tag: text}, step=step)

    def progress(self, step: int) -> None:
        """Move the progress bar to `step` completed steps."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def print(self, message: str) -> None:
        """A line on the console that does not break the progress bar (process 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self) -> None:
        """Make every row written so far durable (on gs://: upload metrics.jsonl and the events)."""
        if self._remote is not None:
            self._remote.upload(self._tb, force=True)
        elif self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        for closer in (self._bar, self._tb, self._jsonl):
            if closer is not None:
                closer.close()
        self._jsonl = self._tb = self._wandb = self._bar = self._remote = None


class _RemoteFiles:
    """metrics.jsonl of a gs:// workdir held in memory, and a local folder for the TensorBoard
    event files; `upload` copies both to the workdir whole (each upload replaces the object)."""

    def __init__(self, workdir: str, path: str, drop_after: int | None):
        self.workdir, self.path = workdir, path
        text = paths.read_text(path) if paths.exists(path) else ""
        lines = text.splitlines(keepends=True)
        if drop_after is not None:  # as _drop_rows_after does for a local file
            lines = [line for line in lines if line.endswith("\n") and _row_step(line) <= drop_after]
        self.lines, self._dirty, self._last = lines, False, 0.0
        if "".join(lines) != text:  # stored at once, as the local file is rewritten at once
            paths.write_atomic(path, "".join(lines))
        self.local_dir = tempfile.mkdtemp(prefix="gpt2_jax-events-")
        self._uploaded: dict[str, int] = {}  # event file -> size uploaded

    def write(self, text: str) -> None:
        self.lines.append(text)
        self._dirty = True

    def upload(self, tb, force: bool) -> None:
        if not force and time.monotonic() - self._last < UPLOAD_EVERY_S:
            return
        self._last = time.monotonic()
        if self._dirty:
            paths.write_atomic(self.path, "".join(self.lines))
            self._dirty = False
        if tb is not None:
            tb.flush()
        for root, _, files in os.walk(self.local_dir):
            for name in files:
                local = os.path.join(root, name)
                rel = os.path.relpath(local, self.local_dir)
                if self._uploaded.get(rel) != os.path.getsize(local):
                    self._uploaded[rel] = os.path.getsize(local)
                    paths.upload(local, paths.join(self.workdir, *rel.split(os.sep)))

    def close(self) -> None:
        """Called after the TensorBoard writer closed: the last upload, then the local copy goes."""
        self._last = 0.0
        try:
            self.upload(None, force=True)
        finally:
            shutil.rmtree(self.local_dir, ignore_errors=True)


def _drop_rows_after(path: str, step: int) -> None:
    """A resumed run starts after its checkpoint's step: rows a killed run logged past it are
    replaced by the resumed run's, so each step appears once (the file is rewritten atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    # a last line without its newline was cut short by a kill: dropped, it would merge with the next
    keep = [line for line in lines if line.endswith("\n") and _row_step(line) <= step]
    if len(keep) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return 0  # not a row of ours: kept


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _postfix(row: dict) -> str:
    parts = [f"loss {row['loss']:.4f}"] + ([f"lr {row['lr']:.2e}"] if "lr" in row else [])
    if "tokens_per_sec" in row:
        parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
    if "mfu" in row:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    if "epoch" in row:
        parts.append(f"epoch {row['epoch']:.2f}")
    return ", ".join(parts)
