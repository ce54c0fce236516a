"""Model FLOPs per token and the devices' peak FLOP/s, for MFU (model FLOPs utilisation).

MFU (model FLOPs utilisation) = achieved model FLOP/s / the devices' peak FLOP/s. Model FLOPs
per token follow PaLM (appendix B): 6 x matmul parameters (blocks and the tied LM head) +
12 x layers x n_embd x sequence length for attention (not halved for the causal mask); remat
recomputation is not counted. Peaks are dense (no sparsity), per device, from the table below;
an unknown device gives no MFU rather than a wrong one.
"""

from __future__ import annotations

import os
import re

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
