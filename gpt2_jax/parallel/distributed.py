"""Joins this process to a multi-process JAX run (flags, JAX_* variables, SLURM, Open MPI or a TPU pod); alone it does nothing.

    argv, kw = distributed.pop_flags(sys.argv)   # --coordinator, --num_processes, --process_id, ...
    distributed.initialize(**kw)                  # before anything touches a JAX device
    ...
    distributed.exit(main_status)                 # a failed process leaves at once (see exit)

Where the settings come from, first match wins:
  1. arguments / flags, then JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
     (what launch/local.sh sets); `--num_processes 1` forces a single process;
  2. SLURM inside `srun` (SLURM_NTASKS > 1) or Open MPI's `mpirun` (OMPI_COMM_WORLD_SIZE > 1):
     jax.distributed.initialize()'s own cluster detection finds the coordinator, count and id;
  3. libtpu installed on a machine with Google PCI devices: JAX's detection reads a Cloud TPU
     pod's metadata (one process per host); where it finds no pod, one process;
  4. otherwise one process: nothing to do.
The coordinator port is `--coordinator_port` / JAX_COORDINATOR_PORT (default 8476 where the
address has none); timeouts are `--init_timeout` / GPT2_JAX_INIT_TIMEOUT (seconds for every
process to join, default 300) and `--heartbeat_timeout` / GPT2_JAX_HEARTBEAT_TIMEOUT (seconds
of silence after which a process counts as dead and the others stop, default 100); both go to
jax.distributed.initialize (initialization_timeout, heartbeat_timeout_seconds).

JAX's own failure on a missed join is a C++ abort with a stack trace; a watchdog here turns it
into one line naming the process, `error: process 1 of 2 ...`, and exit status 2.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpt2_jax.errors import UserError
from gpt2_jax.parallel import topology

DEFAULT_PORT = 8476  # JAX's default coordinator port on TPU pods
DEFAULT_INIT_TIMEOUT = 300.0
DEFAULT_HEARTBEAT_TIMEOUT = 100.0
# JAX's own join deadline is set past ours, so the watchdog's clear message comes first.
_JAX_DEADLINE_MARGIN_S = 10

# What JAX's SLURM / Open MPI detection reads; we only look at the process count.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI_VARS = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips, but also the gVNIC of every GCE VM: the device id tells
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}  # v3 ... TPU7x (as JAX lists them)


class DistributedError(UserError):
    """The multi-process start-up cannot go ahead (bad settings, a process that did not join)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process runs. source: 'single' | 'explicit' | 'slurm' | 'mpi' | 'tpu'. With a
    detected source JAX finds the settings itself: the count and id are filled in once
    initialize() returns; the coordinator stays None (JAX does not publish it)."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: float = DEFAULT_INIT_TIMEOUT
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT

    @property
    def multi_process(self) -> bool:
        return self.source != "single"

    def describe(self) -> str:
        if not self.multi_process:
            return "single process"
        who = "?" if self.process_id is None else self.process_id
        of = "?" if self.num_processes is None else self.num_processes
        return f"process {who} of {of} ({self.source}, coordinator {self.coordinator or 'auto'})"


# --- settings -> plan (pure: no JAX) ---------------------------------------------------------


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    port: int | None = None,
    init_timeout: float | None = None,
    heartbeat_timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
    tpu_runtime: bool | None = None,
) -> Plan:
    """The Plan for these settings and this environment; raises DistributedError if they disagree."""
    env = os.environ if environ is None else environ
    given_id = process_id
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _int("num_processes", num_processes, env, "JAX_NUM_PROCESSES", minimum=1)
    process_id = _int("process_id", process_id, env, "JAX_PROCESS_ID", minimum=0)
    port = _int("coordinator_port", port, env, "JAX_COORDINATOR_PORT", minimum=1)
    timeouts = dict(
        init_timeout=_seconds("init_timeout", init_timeout, env, "GPT2_JAX_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT),
        heartbeat_timeout=_seconds(
            "heartbeat_timeout", heartbeat_timeout, env, "GPT2_JAX_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT
        ),
    )
    if port is not None and port > 65535:
        raise DistributedError(f"--coordinator_port must be at most 65535, got {port}")
    if num_processes == 1:
        if given_id not in (None, 0):  # a leftover JAX_PROCESS_ID does not matter here
            raise DistributedError(f"--process_id {given_id} with --num_processes 1: the only process is 0")
        return Plan("single", num_processes=1, process_id=0, **timeouts)
    if coordinator or num_processes is not None or process_id is not None:
        return _explicit(coordinator, num_processes, process_id, port, timeouts)
    for source, names in (("slurm", _SLURM_VARS), ("mpi", _OMPI_VARS)):
        if all(v in env for v in names):
            count, rank = names[2:4] if source == "slurm" else names[1:3]
            n = _int(count, None, env, count, 1)
            if n > 1:  # one task (an `salloc` shell, `srun -n1`) needs no distributed runtime
                return Plan(source, None, n, _int(rank, None, env, rank, 0), **timeouts)
            return Plan("single", num_processes=1, process_id=0, **timeouts)
    if _tpu_runtime_installed() if tpu_runtime is None else tpu_runtime:
        return Plan("tpu", **timeouts)
    return Plan("single", num_processes=1, process_id=0, **timeouts)


def _explicit(coordinator, num_processes, process_id, port, timeouts) -> Plan:
    missing = [
        f"{flag} (or {var})"
        for flag, var, value in (
            ("--coordinator", "JAX_COORDINATOR_ADDRESS", coordinator),
            ("--num_processes", "JAX_NUM_PROCESSES", num_processes),
            ("--process_id", "JAX_PROCESS_ID", process_id),
        )
        if value is None
    ]
    if missing:
        raise DistributedError(f"a multi-process run needs {', '.join(missing)} as well")
    if process_id >= num_processes:
        raise DistributedError(f"--process_id {process_id} is out of range for --num_processes {num_processes}")
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]\s]+)(?::(\d+))?", coordinator)
    if not match:
        raise DistributedError(f"--coordinator {coordinator!r}: expected HOST, HOST:PORT or [IPv6]:PORT")
    host, given = match.groups()
    address = f"{host}:{port or given or DEFAULT_PORT}"
    return Plan("explicit", address, num_processes, process_id, **timeouts)


def _int(name, value, env, var, minimum) -> int | None:
    if value is None:
        raw = env.get(var, "").strip()
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise DistributedError(f"{var}={raw!r} is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DistributedError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _seconds(name, value, env, var, default) -> float:
    if value is None:
        raw = env.get(var, "").strip()
        try:
            value = float(raw) if raw else default
        except ValueError:
            raise DistributedError(f"{var}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise DistributedError(f"--{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _tpu_runtime_installed() -> bool:
    """libtpu is installed (jax[tpu]) and a TPU chip is on the PCI bus (Google's vendor id and a
    TPU device id: a GCE VM's gVNIC shares the vendor); whether this is a pod, JAX's detection decides."""
    if not topology.libtpu_available():
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if (Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR
                    and Path(vendor).with_name("device").read_text().strip() in _TPU_PCI_DEVICES):  # fmt: skip
                return True
        except OSError:
            continue
    return False


# --- start-up ----------------------------------------------------------------------------------


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    port: int | None = None,
    init_timeout: float | None = None,
    heartbeat_timeout: float | None = None,
) -> Plan:
    """Call jax.distributed.initialize when the run is multi-process (see the module docstring);
    a no-op for a single process or when already initialised. Must run before any JAX array or
    device query. Returns the Plan, with the process id and count filled in."""
    import jax

    plan = resolve(coordinator, num_processes, process_id, port, init_timeout, heartbeat_timeout)
    if not plan.multi_process:
        return plan
    if jax.distributed.is_initialized():
        return _filled(plan)
    if plan.coordinator is None and port is not None:  # detected: JAX finds the host, we set the port
        os.environ["JAX_COORDINATOR_PORT"] = str(port)
    watchdog = threading.Timer(plan.init_timeout, _join_timed_out, args=(plan,))
    watchdog.daemon = True
    watchdog.start()
    try:  # explicit settings are passed; detected ones (None) JAX's cluster detection fills in
        jax.distributed.initialize(
            coordinator_address=plan.coordinator,
            num_processes=None if plan.coordinator is None else plan.num_processes,
            process_id=None if plan.coordinator is None else plan.process_id,
            initialization_timeout=int(plan.init_timeout) + _JAX_DEADLINE_MARGIN_S,
            heartbeat_timeout_seconds=max(1, round(plan.heartbeat_timeout)),
        )
    except Exception as e:
        if isinstance(e, ValueError) and plan.source == "tpu":  # JAX's detection found no pod: one process
            return dataclasses.replace(plan, source="single", num_processes=1, process_id=0)
        hint = ""
        if "must be called before" in str(e):  # JAX refuses once a device was used
            hint = "; call gpt2_jax.parallel.distributed.initialize() first thing in main()"
        raise DistributedError(
            f"{plan.describe()}: could not start the distributed runtime: {_first_line(e)}{hint}"
        ) from e
    finally:
        watchdog.cancel()
    if jax.config.jax_cpu_collectives_implementation is None:  # cross-process collectives on CPU
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.excepthook = _exit_on_uncaught
    return _filled(plan)


def _filled(plan: Plan) -> Plan:
    import jax

    return dataclasses.replace(plan, num_processes=jax.process_count(), process_id=jax.process_index())


def _join_timed_out(plan: Plan) -> None:
    """Runs on the watchdog thread: JAX would abort with a stack trace later; say it in one line."""
    _flush()
    sys.stderr.write(
        f"error: {plan.describe()} timed out after {plan.init_timeout:g} s waiting for all processes to "
        "join; check that every process was started with the same coordinator and process count and "
        "can reach the coordinator's port, or raise --init_timeout\n"
    )
    _flush()
    os._exit(2)


def _exit_on_uncaught(kind, value, tb) -> None:
    """An uncaught exception in a multi-process run: print it and leave at once. A normal exit
    would wait at JAX's shutdown barrier for the others (up to minutes), while they wait for us."""
    traceback.print_exception(kind, value, tb)
    _flush()
    os._exit(1)


def exit(status: int | None) -> None:
    """sys.exit(status), except that a failing process of a multi-process run leaves at once
    (skipping JAX's shutdown barrier), so the others notice within the heartbeat timeout."""
    import jax

    status = status or 0
    if status and jax.distributed.is_initialized():
        _flush()
        os._exit(status)
    sys.exit(status)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# --- command line ------------------------------------------------------------------------------

FLAGS = {
    "--coordinator": ("coordinator", str),
    "--num_processes": ("num_processes", int),
    "--process_id": ("process_id", int),
    "--coordinator_port": ("port", int),
    "--init_timeout": ("init_timeout", float),
    "--heartbeat_timeout": ("heartbeat_timeout", float),
}

HELP = """\
multi-process flags (all optional; see gpt2_jax/parallel/distributed.py):
  --coordinator HOST[:PORT]  process 0's address (or JAX_COORDINATOR_ADDRESS)
  --num_processes N          processes in the run (or JAX_NUM_PROCESSES); 1 turns detection off
  --process_id I             this process, 0..N-1 (or JAX_PROCESS_ID)
  --coordinator_port P       coordinator port (or JAX_COORDINATOR_PORT; default 8476)
  --init_timeout S           seconds for all processes to join (default 300)
  --heartbeat_timeout S      seconds before a silent process counts as dead (default 100)"""


def pop_flags(argv: Sequence[str]) -> tuple[list[str], dict]:
    """Split the multi-process flags (`--flag V` or `--flag=V`) out of argv: returns the other
    arguments, in order, and keyword arguments for initialize(). Raises DistributedError."""
    rest, kwargs = [], {}
    args = list(argv)
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag not in FLAGS:
            rest.append(args[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise DistributedError(f"{flag} needs a value")
            value, i = args[i + 1], i + 1
        name, kind = FLAGS[flag]
        try:
            kwargs[name] = kind(value)
        except ValueError:
            raise DistributedError(
                f"{flag} {value!r}: expected {'an integer' if kind is int else 'a number'}"
            ) from None
        i += 1
    return rest, kwargs


def add_arguments(parser) -> None:
    """The same flags on an argparse parser; pass `initialize(**kwargs_from(namespace))`."""
    group = parser.add_argument_group("multi-process")
    for flag, (name, kind) in FLAGS.items():
        group.add_argument(flag, dest=f"dist_{name}", type=kind, default=None)


def kwargs_from(namespace) -> dict:
    return {name: getattr(namespace, f"dist_{name}") for name, _ in FLAGS.values()}
