"""`train --dry_run`: compile the train step ahead of time (here or for a TPU topology); report what a device needs.

Nothing is allocated and no data is read: the step is lowered from abstract shapes carrying the
run's shardings, and XLA's memory analysis of the compiled (partitioned) program gives what one
device needs: arguments (the train state and a batch), outputs (the new state; donated, so it
reuses the arguments' buffers), and temporaries (activations, gradients, optimizer scratch).
Their sum overestimates (buffers live at different times); the compiler's peak_memory_in_bytes is
what it needs, and for a TPU the compiler itself refuses a program that does not fit the chip's
HBM (RESOURCE_EXHAUSTED): that verdict decides `fits`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

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
    device_memory: int | None  # what one device can hold: the chip's HBM for a TPU topology, else what
    # the device reports (CPU: its share of the host's available RAM); None where unknown
    model_flops_per_step: float  # 6N + attention, per token, x tokens per step (all devices)
    xla_flops: float | None  # XLA's count for one device's program (a loop body counts once)
    compile_seconds: float
    memory_kind: str = "device memory"  # what device_memory measures, for the report
    peak: int | None = None  # the compiler's peak_memory_in_bytes (None or 0 where it has none)
    out_of_memory: str | None = None  # the compiler's RESOURCE_EXHAUSTED verdict, when it gave one
    topology: str | None = None  # the TPU slice compiled for (--topology), None for this job's devices
    platform: str = ""  # the devices' platform: 'cpu', 'gpu', 'tpu'

    @property
    def compiler_checked(self) -> bool:
        """The compiler placed the program in the device's memory (TPU's refuses what does not fit)."""
        return self.platform == "tpu"

    @property
    def oom_required(self) -> int | None:
        return _oom_bytes(self.out_of_memory)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def needed(self) -> int:
        """Bytes per device: the compiler's peak where it reports a real one, else the (larger)
        total. XLA:CPU's peak_memory_in_bytes counts little more than the arguments (not the
        temporaries), so on CPU devices the total is the honest figure."""
        return self.total if self.platform == "cpu" or not self.peak else self.peak

    @property
    def fits(self) -> bool | None:
        if self.out_of_memory is not None:
            return False
        if self.compiler_checked:  # TPU's compiler refuses (RESOURCE_EXHAUSTED) what does not fit
            return True
        return None if self.device_memory is None else self.needed <= self.device_memory


def estimate(trainer, p: Plan, batch_size: int, grad_accum: int, hbm_bytes: int | None = None,
             topology: str | None = None) -> Estimate:
    """Compile `trainer.train_fn` for this plan's mesh from abstract values (see module doc).
    `hbm_bytes`: the memory of one of the mesh's devices where they cannot say (`topology`'s)."""
    micro = (grad_accum, batch_size // grad_accum, p.block_size)
    batch = {k: jax.ShapeDtypeStruct(micro, dtype, sharding=trainer.train_batch_sharding)
             for k, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}  # fmt: skip
    device = p.mesh.devices.flat[0]
    start = time.perf_counter()
    lowered = trainer.train_fn.lower(trainer.abstract_state, batch)
    oom, compiled = None, None
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError; the TPU compiler's verdict on memory is an answer, not a crash
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        oom = " ".join(str(e).split())[:400]
    seconds = time.perf_counter() - start
    sizes = dict.fromkeys(("arguments", "outputs", "aliased", "temporaries", "code"), 0)
    xla_flops, peak = None, None
    if compiled is not None:
        mem = compiled.memory_analysis()
        sizes = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                     aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                     code=mem.generated_code_size_in_bytes)  # fmt: skip
        peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0) or None
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost["flops"]) if cost and cost.get("flops", -1) >= 0 else None
    return Estimate(
        **sizes, device_memory=hbm_bytes or _device_memory(device),
        memory_kind=f"HBM of a {device.device_kind} chip" if hbm_bytes else _memory_kind(device),
        model_flops_per_step=flops.flops_per_token(p.model, p.block_size) * batch_size * p.block_size,
        xla_flops=xla_flops, compile_seconds=seconds, peak=peak, out_of_memory=oom,
        topology=topology, platform=device.platform,
    )  # fmt: skip


def _oom_bytes(message: str | None) -> int | None:
    """What the compiler said it needed, from its RESOURCE_EXHAUSTED message ('... required for HLO
    temporaries (20.86G) exceeds ...'); None if it names no size."""
    m = re.search(r"\(([\d.]+)([KMGT])\) exceeds", message or "")
    return None if m is None else int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


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
    where = f"{e.topology} ({p.mesh.devices.flat[0].device_kind}), " if e.topology else ""
    lines = [f"dry run: train step compiled for {where}{sharding_text(p)}, grad_accum {p.grad_accum}, attention "
             f"{p.model.attention}, in {e.compile_seconds:.1f} s; per device:"]  # fmt: skip
    if e.out_of_memory is None:
        lines += [
            f"  arguments    {gib(e.arguments)}   (train state + batch)",
            f"  outputs      {gib(e.outputs)}   ({gib(e.aliased).strip()} of it written into donated arguments)",
            f"  temporaries  {gib(e.temporaries)}   (activations, gradients, optimizer scratch)",
            f"  code         {gib(e.code)}",
            f"  total        {gib(e.total)}   (arguments + outputs - donated + temporaries + code)",
        ]
        if e.peak and e.platform != "cpu":
            lines.append(f"  peak         {gib(e.peak)}   (the compiler's peak_memory_in_bytes: what it needs)")
    else:
        lines.append(f"  the compiler: {e.out_of_memory}")
    lines.append(f"model FLOPs per step: {e.model_flops_per_step:.3e} ({e.model_flops_per_step / n:.3e} per device)"
                 + (f"; XLA's count for one device's program: {e.xla_flops:.3e} (loops counted once)" if e.xla_flops else ""))  # fmt: skip
    memory = "" if e.device_memory is None else f"{e.device_memory / GIB:.2f} GiB {e.memory_kind}"
    if e.fits is None:
        lines.append("device memory: not reported by this backend; compare the peak with your accelerator's")
    elif e.fits:
        lines.append(f"fits: {e.needed / GIB:.2f} of {memory}" + ("; the compiler's verdict" if e.compiler_checked else ""))
    elif e.out_of_memory is not None:
        lines.append(f"does NOT fit: the compiler ran out of the {memory}. " + ADVICE)
    else:
        lines.append(f"does NOT fit: needs {e.needed / GIB:.2f} GiB per device, there are "
                     f"{e.device_memory / GIB:.2f} GiB of {e.memory_kind}. " + ADVICE)  # fmt: skip
    return "\n".join(lines)


def json_line(e: Estimate, p: Plan) -> str:
    """The estimate as the one JSON object the dry run prints last (DESIGN.md section 3)."""
    known = lambda b: b if e.out_of_memory is None else None  # noqa: E731  (no sizes from a refused compile)
    return json.dumps({
        "topology": e.topology, "devices": int(p.mesh.devices.size), "device_kind": p.mesh.devices.flat[0].device_kind,
        "mesh": {k: int(v) for k, v in p.mesh.shape.items()}, "grad_accum": p.grad_accum,
        "attention": p.model.attention, "peak_bytes_per_device": None if e.out_of_memory else e.needed,
        "hbm_bytes_per_device": e.device_memory, "fits": e.fits, "compile_s": round(e.compile_seconds, 2),
        "arguments_bytes": known(e.arguments), "outputs_bytes": known(e.outputs), "aliased_bytes": known(e.aliased),
        "temporaries_bytes": known(e.temporaries), "code_bytes": known(e.code), "total_bytes": known(e.total),
        "oom_required_bytes": e.oom_required, "model_flops_per_step": e.model_flops_per_step, "xla_flops": e.xla_flops,
    })  # fmt: skip


ADVICE = ("To shrink it: raise grad_accum or lower microbatch_per_device (smaller microbatches, fewer "
          "activations), set model.remat=dots_saveable or full, shard parameters and optimizer state with "
          "mesh.fsdp=-1, or lower batch_size")


def sharding_text(p: Plan) -> str:
    shape = dict(p.mesh.shape)
    return f"mesh data={shape['data']} x fsdp={shape['fsdp']} x tensor={shape['tensor']} ({p.mesh.devices.size} devices)"
