"""`train --dry_run`: compile the train step ahead of time and report per-device memory and FLOPs.

Nothing is allocated and no data is read: the step is lowered from abstract shapes carrying the
run's shardings, and XLA's memory analysis of the compiled (partitioned) program gives what one
device needs: arguments (the train state and a batch), outputs (the new state; donated, so it
reuses the arguments' buffers), and temporaries (activations, gradients, optimizer scratch).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from gpt2_jax.train import flops
from gpt2_jax.train.plan import Plan

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Estimate:
    arguments: int  # bytes per device
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int
    code: int
    device_memory: int | None  # what the device reports it can hold (CPU: its share of the host's
    # available RAM); None where unknown
    model_flops_per_step: float  # 6N + attention, per token, x tokens per step (all devices)
    xla_flops: float | None  # XLA's count for one device's program (a loop body counts once)
    compile_seconds: float
    memory_kind: str = "device memory"  # what device_memory measures, for the report

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory


def estimate(trainer, p: Plan, batch_size: int, grad_accum: int) -> Estimate:
    """Compile `trainer.train_fn` for this plan's mesh from abstract values (see module doc)."""
    import time

    micro = (grad_accum, batch_size // grad_accum, p.block_size)
    batch = {k: jax.ShapeDtypeStruct(micro, dtype, sharding=trainer.train_batch_sharding)
             for k, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}  # fmt: skip
    start = time.perf_counter()
    compiled = trainer.train_fn.lower(trainer.abstract_state, batch).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost["flops"]) if cost and cost.get("flops", -1) >= 0 else None
    return Estimate(
        arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes, aliased=mem.alias_size_in_bytes,
        temporaries=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes,
        device_memory=_device_memory(p.mesh.devices.flat[0]), memory_kind=_memory_kind(p.mesh.devices.flat[0]),
        model_flops_per_step=flops.flops_per_token(p.model, p.block_size) * batch_size * p.block_size,
        xla_flops=xla_flops, compile_seconds=seconds,
    )  # fmt: skip


def _device_memory(device) -> int | None:
    if device.platform == "cpu":  # XLA:CPU reports no limit; its devices share the host's RAM
        available = host_available_bytes()
        return None if available is None else available // jax.local_device_count("cpu")
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend implements it
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _memory_kind(device) -> str:
    if device.platform == "cpu":
        n = jax.local_device_count("cpu")
        return f"host RAM (available RAM shared by {n} CPU device{'s' if n > 1 else ''})"
    return "device memory"


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """RAM the host can give without swapping: MemAvailable (Linux), else free pages; None if unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # not every OS names these
        return None


def report(e: Estimate, p: Plan) -> str:
    """The estimate as lines of text, with advice when it does not fit."""
    n = p.mesh.devices.size
    gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [
        f"dry run: train step compiled for {sharding_text(p)} in {e.compile_seconds:.1f} s; per device:",
        f"  arguments    {gib(e.arguments)}   (train state + batch)",
        f"  outputs      {gib(e.outputs)}   ({gib(e.aliased).strip()} of it written into donated arguments)",
        f"  temporaries  {gib(e.temporaries)}   (activations, gradients, optimizer scratch)",
        f"  code         {gib(e.code)}",
        f"  total        {gib(e.total)}",
        f"model FLOPs per step: {e.model_flops_per_step:.3e} ({e.model_flops_per_step / n:.3e} per device)"
        + (f"; XLA's count for one device's program: {e.xla_flops:.3e} (loops counted once)" if e.xla_flops else ""),
    ]
    if e.device_memory is None:
        lines.append("device memory: not reported by this backend; compare the total with your accelerator's")
    elif e.fits:
        lines.append(f"fits: {e.total / GIB:.2f} of {e.device_memory / GIB:.2f} GiB {e.memory_kind}")
    else:
        lines.append(f"does NOT fit: needs {e.total / GIB:.2f} GiB per device, there are "
                     f"{e.device_memory / GIB:.2f} GiB of {e.memory_kind}. " + ADVICE)  # fmt: skip
    return "\n".join(lines)


ADVICE = ("To shrink it: raise grad_accum (smaller microbatches, fewer activations), set "
          "model.remat=dots_saveable or full, shard parameters and optimizer state with mesh.fsdp=-1, "
          "or lower batch_size")


def sharding_text(p: Plan) -> str:
    shape = dict(p.mesh.shape)
    return f"mesh data={shape['data']} x fsdp={shape['fsdp']} x tensor={shape['tensor']} ({p.mesh.devices.size} devices)"
