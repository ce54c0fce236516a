"""TPU slices by name (`v5e:2x2`, `v5p:2x2x1`, ...): their compile-only devices from libtpu, and each chip's HBM.

    devices = topology_devices("v5e:2x2")   # 4 compile-only TPU v5 lite devices, no TPU needed
    mesh = sharding.make_mesh((4, 1, 1), devices)

jax.experimental.topologies.get_topology_desc builds the devices from libtpu (`pip install -e
".[tpu]"`) on any host, the way MaxText's train_compile.py compiles for a slice it does not have.
Call quiet_libtpu() before JAX starts a backend: on a host without TPUs libtpu otherwise prints
TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES errors and may take a lock another process holds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from gpt2_jax.errors import UserError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    libtpu_name: str  # the generation as get_topology_desc spells it
    hbm_bytes: int  # per chip (one JAX device; megacore chips are one device)
    dims: int  # 2 (a torus of x by y chips) or 3
    chip_config: str  # 'default' or 'megacore'


# Per chip HBM from Google Cloud's TPU pages: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
# The compile-only devices report no memory_stats(), so the table is what a step is compared with.
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 3, "megacore"),
    "v5e": Chip("v5e", 16 * GIB, 2, "default"),
    "v5p": Chip("v5", 95 * GIB, 3, "megacore"),
    "v6e": Chip("v6e", 32 * GIB, 2, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e", "trillium": "v6e"}
# Env settings that let libtpu start on a host with no TPU (compile-only) and keep it quiet;
# set only where unset, and only for --topology.
QUIET_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",  # do not ask the GCE metadata server what this VM is
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",  # replaced by the slice's own type (accelerator_type)
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # no /tmp/libtpu_lockfile: compiles may run side by side
    "TF_CPP_MIN_LOG_LEVEL": "2",  # libtpu's own INFO / WARNING lines at start-up
}


class TopologyError(UserError, ValueError):
    """A topology name that is not a TPU slice, or no libtpu to compile for it."""


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given, normalised: 'v5e:2x2'
    chip: Chip
    shape: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_topology(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"


def parse(name: str) -> Slice:
    """'v5e:2x2' (also 'v5litepod:2x2', 'v5p:2x2x1', 'v4:2x2x1', 'v6e:2x4') -> Slice; TopologyError
    naming the fix for anything else."""
    m = re.fullmatch(r"\s*([a-z0-9]+)[:-]((?:\d+x)*\d+)\s*", name.lower())
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in CHIPS:
        raise TopologyError(f"--topology {name!r} is not a TPU slice; use GENERATION:SHAPE with GENERATION one of "
                            f"{', '.join(CHIPS)}, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1, v4:2x2x1, v6e:2x4")
    chip, shape = CHIPS[gen], tuple(int(d) for d in m.group(2).split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
        example = "2x2x1" if chip.dims == 3 else "2x4"
        raise TopologyError(f"--topology {name!r}: a {gen} slice has {chip.dims} dimensions (e.g. {gen}:{example})")
    return Slice(f"{gen}:{'x'.join(map(str, shape))}", chip, shape)


def quiet_libtpu(s: Slice | None = None) -> None:
    """Set QUIET_ENV (with `s`'s accelerator type) where unset: call before JAX starts any backend."""
    env = {**QUIET_ENV, **({"TPU_ACCELERATOR_TYPE": accelerator_type(s)} if s else {})}
    for key, value in env.items():
        os.environ.setdefault(key, value)


def accelerator_type(s: Slice) -> str:
    """Google Cloud's name for the slice: v5litepod-4, v6e-8; v4 and v5p count TensorCores (2 a chip)."""
    prefix = {"v5e": "v5litepod", "v6e": "v6e", "v4": "v4", "v5p": "v5p"}[s.name.split(":")[0]]
    return f"{prefix}-{s.num_chips * (2 if s.chip.chip_config == 'megacore' else 1)}"


def compile_only_host() -> None:
    """Keep this process's own backend on its CPU (where JAX_PLATFORMS does not say otherwise):
    a topology's devices compile without it, and on a TPU VM the chips stay free for a real run."""
    import jax
    from jax._src import xla_bridge  # no public "have the backends started" (jax 0.10)

    if not os.environ.get("JAX_PLATFORMS") and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def libtpu_available() -> bool:
    """Whether libtpu (the `.[tpu]` extra) is installed."""
    import importlib.util

    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):  # a broken or half-imported install counts as none
        return False


def topology_devices(s: Slice) -> list:
    """The slice's compile-only devices (jax.Device objects of platform 'tpu'); TopologyError
    when libtpu is missing or refuses the shape."""
    if not libtpu_available():
        raise TopologyError(f"--topology {s.name} compiles with libtpu, which is not installed: pip install -e \".[tpu]\"")
    from jax.experimental import topologies

    kwargs = {"chip_config_name": s.chip.chip_config}
    bounds = (*s.shape, 1)[:3]
    if any(d % h for d, h in zip(bounds, (2, 2, 1))):  # smaller than a 4-chip host (v5e:1x1, v5e:2x1): one host
        kwargs["chips_per_host_bounds"] = bounds
    try:
        devices = list(topologies.get_topology_desc(s.libtpu_topology, "tpu", **kwargs).devices)
    except Exception as e:  # libtpu's messages are long; the first line says what it refused
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TopologyError(f"--topology {s.name}: libtpu cannot build it ({first})") from None
    if len(devices) != s.num_chips:  # a megacore chip is one device; anything else would change the per-chip sums
        raise TopologyError(f"--topology {s.name}: libtpu made {len(devices)} devices for {s.num_chips} chips")
    return devices
