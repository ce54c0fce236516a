"""Training metrics out: progress bar, metrics.jsonl, TensorBoard and (optionally) wandb."""

from __future__ import annotations

import json
import os
from typing import Any


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
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if drop_after is not None:  # a (re)started run: earlier rows past its start are stale
            _drop_rows_after(path, drop_after)
        self._jsonl = open(path, "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=workdir)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=wandb_name or None, config=run_config, dir=workdir)
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

    def close(self) -> None:
        for closer in (self._bar, self._tb, self._jsonl):
            if closer is not None:
                closer.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._tb = self._wandb = self._bar = None


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
