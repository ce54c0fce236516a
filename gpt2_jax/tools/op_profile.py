"""Where a compiled step spends its time: one call traced with jax.profiler, summed per XLA op.

The trace (a Perfetto JSON file, also readable by TensorBoard's profiler) stays on disk for a
closer look; `op_times` reads it back. On a CPU, XLA runs its ops on host threads beside
bookkeeping events (thunk executors, Python frames), so ops are told apart by their names (XLA
instruction names: lower case, digits, '_', '-', '.'). On a GPU or TPU the device's own events
are used, named by the XLA op they belong to where the trace says (`hlo_op`): its "XLA Ops"
line where the trace has one, else its stream lines, else all its lines (only the CPU case has
been checked so far). Control flow (while, conditional, call) is left out: its time is its
body's ops, which are traced too. Ops can run concurrently (XLA:CPU runs independent ops on
several threads), so their times can add up to more than the step took.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Callable, NamedTuple

import jax

XLA_OP_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")
CONTROL_FLOW = ("while", "conditional", "call")


class NoDeviceEvents(ValueError):
    """The trace of an accelerator run holds no device events (the profiler could not read the
    device: on NVIDIA GPUs it needs CUPTI)."""


class OpTime(NamedTuple):
    name: str
    ms: float  # summed over the traced call
    count: int


def trace(fn: Callable[[], object], directory: str) -> str:
    """Run `fn()` once, to completion, under the JAX profiler; return the trace file it wrote."""
    os.makedirs(directory, exist_ok=True)
    before = set(_trace_files(directory))
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        jax.block_until_ready(fn())
    new = sorted(set(_trace_files(directory)) - before, key=os.path.getmtime)
    if not new:
        raise RuntimeError(f"the profiler wrote no trace under {directory}")
    return new[-1]


def _trace_files(directory: str) -> list[str]:
    return glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)


def op_times(path: str, device: bool = False) -> list[OpTime]:
    """Time per op in the trace at `path`, longest first. `device`: the traced run used an
    accelerator, so a trace without device events raises NoDeviceEvents rather than reporting
    host-side launches as op times."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}  # fmt: skip
    devices = {pid for pid, name in processes.items() if "/device:" in name}
    if devices:
        lines = ({key for key, name in threads.items() if key[0] in devices and name == "XLA Ops"}
                 or {key for key, name in threads.items() if key[0] in devices and name.startswith("Stream")})  # fmt: skip

        def keep(e):
            return (e["pid"], e.get("tid")) in lines if lines else e["pid"] in devices
    elif device:
        raise NoDeviceEvents(f"{path} has no device events: the profiler could not read the device (on NVIDIA "
                             "GPUs it needs CUPTI); open the trace to see what it holds")  # fmt: skip
    else:

        def keep(e):
            return bool(XLA_OP_NAME.match(e["name"]))

    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and keep(e):
            name = e.get("args", {}).get("hlo_op") or e["name"]
            if _kind(name) not in CONTROL_FLOW:
                total[name] += e["dur"]
                count[name] += 1
    return [OpTime(name, us / 1e3, count[name]) for name, us in total.most_common()]


def by_kind(ops: list[OpTime]) -> list[OpTime]:
    """Ops summed by kind: the name without XLA's '.N' suffix (all the ynn_fusion.N together)."""
    total, count = collections.Counter(), collections.Counter()
    for op in ops:
        total[_kind(op.name)] += op.ms
        count[_kind(op.name)] += op.count
    return [OpTime(kind, ms, count[kind]) for kind, ms in total.most_common()]


def _kind(name: str) -> str:
    return re.sub(r"\.\d+$", "", name)


def table(ops: list[OpTime], top: int = 15, title: str = "op") -> str:
    """The `top` longest ops with their share of the summed op time."""
    total = sum(op.ms for op in ops) or 1.0
    width = max([len(title)] + [len(op.name[:60]) for op in ops[:top]])
    lines = [f"{title:<{width}} {'ms':>9} {'share':>6} {'calls':>6}"]
    lines += [f"{op.name[:60]:<{width}} {op.ms:>9.1f} {100 * op.ms / total:>5.1f}% {op.count:>6}" for op in ops[:top]]
    lines.append(f"{'all ' + str(len(ops)):<{width}} {total:>9.1f} {100.0:>5.1f}%")
    return "\n".join(lines)
