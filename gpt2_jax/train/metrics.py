"""Training metrics out: progress bar, metrics.jsonl, TensorBoard, optional wandb; FLOPs and MFU.

MFU (model FLOPs utilisation) = achieved model FLOP/s / the devices' peak FLOP/s. Model FLOPs
per token follow PaLM (appendix B): 6 x matmul parameters (blocks and the tied LM head) +
12 x layers x n_embd x sequence length for attention (not halved for the causal mask); remat
recomputation is not counted. Peaks are dense (no sparsity), per device, from the table below;
an unknown device gives no MFU rather than a wrong one.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from gpt2_jax.model import GPT2Config

# (lower-case substring of jax's device_kind, dense bfloat16 FLOP/s, dense float32 FLOP/s).
# First match wins, so specific names come before general ones. float32 on NVIDIA GPUs runs
# as TF32 under XLA's default matmul precision; TPUs run float32 matmuls through the bf16 units.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756e12, 378e12),
    ("h100 nvl", 835e12, 418e12),
    ("h100", 989e12, 494e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200 nvl", 835e12, 418e12),
    ("h200", 989e12, 494e12),
    ("gb200", 2500e12, 1250e12),
    ("b200", 2250e12, 1100e12),
    ("a100", 312e12, 156e12),
    ("tpu v4", 275e12, 275e12),
    ("tpu v5 lite", 197e12, 197e12),  # v5e reports itself as "TPU v5 lite"
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),
    ("tpu v6 lite", 918e12, 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12, 918e12),
)


def matmul_params(config: GPT2Config) -> int:
    """Parameters that take part in a matmul per token: the blocks' kernels and the LM head."""
    return config.n_layer * 12 * config.n_embd**2 + config.padded_vocab_size * config.n_embd


def flops_per_token(config: GPT2Config, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at sequence length `seq_len`."""
    return 6 * matmul_params(config) + 12 * config.n_layer * config.n_embd * seq_len


def _cpu_peak(dtype: str) -> float | None:
    """Rough peak of this host's CPU cores: cores x clock x FMA FLOPs per cycle from the
    instruction set (AVX-512: 64, AVX2+FMA: 32 in float32). None off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    if not mhz or not flags:
        return None
    flags = flags.group(1).split()
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags and "avx2" in flags else 8
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores * float(mhz.group(1)) * 1e6 * per_cycle


def device_peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Peak dense FLOP/s of one accelerator of `device_kind` (jax's Device.device_kind), or None."""
    kind = device_kind.lower()
    for name, bf16, f32 in DEVICE_PEAKS:
        if name in kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


def total_peak_flops(devices, dtype: str = "bfloat16", override_per_device: float = 0.0) -> float | None:
    """Peak FLOP/s of `devices` together. CPU devices of one process share the host's cores, so
    a CPU run counts one host peak per process. `override_per_device` > 0 replaces the table
    (per device; per process on CPU)."""
    devices = list(devices)
    if devices and all(d.platform == "cpu" for d in devices):
        processes = len({d.process_index for d in devices})
        peak = override_per_device or _cpu_peak(dtype)
        return None if peak is None else peak * processes
    total = 0.0
    for d in devices:
        peak = override_per_device or device_peak_flops(d.device_kind, dtype)
        if peak is None:
            return None
        total += peak
    return total


def mfu(tokens_per_sec: float, flops_token: float, peak: float | None) -> float | None:
    return None if not peak else tokens_per_sec * flops_token / peak


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
