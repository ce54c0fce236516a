"""Device mesh (data, fsdp, tensor) and the logical-axis rules that turn model axis names into shardings.

The model names logical axes only ('batch', 'embed', 'heads', ...; see model.py). The rules here map
them onto three mesh axes, so data parallel, FSDP (ZeRO-3 style: parameters and optimizer state
sharded, gathered per layer) and tensor parallel are one config change apart:

    mesh = make_mesh(resolve_mesh_shape(data=-1, fsdp=1, tensor=1, num_devices=jax.device_count()))
    with use_mesh(mesh, DEFAULT_RULES):
        ...  # jit / trace here: the model's activation constraints resolve against `mesh`

Everything works on global arrays and jax.process_index(), so it serves multi-process runs too.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]

# Tensor parallelism divides every matrix: c_attn's kernel is stored head-major (embed, qkv,
# heads, head_dim) = (D, 3, H, Dh), so 'heads' splits it (and its (3, H, Dh) bias) by heads
# without cutting across q/k/v; c_proj's input and c_fc's output go to 'tensor' too, and wte's
# rows. 'qkv' (size 3) and 'head_dim' stay whole; 'layers', the leading axis of scanned
# (stacked) parameters, is never split. 'embed' goes to 'fsdp' so that FSDP shards every
# matrix; activations keep their embedding whole ('act_embed'). Vectors over 'embed' (LayerNorms,
# the projections' biases) and wpe's positions are not split by 'tensor' (wpe is 1/V of wte).
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("positions", None),
    ("qkv", None),
    ("heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)


class MeshError(UserError, ValueError):
    """A mesh shape that does not fit the devices; the message says how to fix it."""


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 filled so that the product is `num_devices`."""
    shape = {"data": data, "fsdp": fsdp, "tensor": tensor}
    bad = [f"mesh.{k}={v}" for k, v in shape.items() if v == 0 or v < -1]
    if bad:
        raise MeshError(f"{bad[0]} is invalid: each mesh axis is a positive size or -1 (fill)")
    fill = [k for k, v in shape.items() if v == -1]
    if len(fill) > 1:
        raise MeshError(f"only one mesh axis may be -1 (fill), got {', '.join('mesh.' + k for k in fill)}")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if fill:
        if num_devices % fixed:
            raise MeshError(
                f"cannot fill mesh.{fill[0]}: {num_devices} devices are not divisible by the other "
                f"axes' product {fixed}"
            )
        shape[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh data x fsdp x tensor = {data} x {fsdp} x {tensor} = {fixed} but there are "
            f"{num_devices} devices; make the product {num_devices} or set one axis to -1"
        )
    return shape["data"], shape["fsdp"], shape["tensor"]


def make_mesh(shape: tuple[int, int, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes: the compiler partitions, guided by the
    shardings and logical constraints (flax's constraints need Auto, not Explicit, axes)."""
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)


def logical_rules(overrides: Rules = ()) -> tuple:
    """DEFAULT_RULES with `overrides` (logical name -> mesh axes) taking precedence."""
    names = {name for name, _ in overrides}
    for name, axes in overrides:
        for axis in (axes,) if isinstance(axes, str) or axes is None else axes:
            if axis is not None and axis not in MESH_AXES:
                raise MeshError(f"sharding rule {name!r} -> {axes!r} names no mesh axis of {MESH_AXES}")
    return tuple((n, _as_axes(a)) for n, a in overrides) + tuple(r for r in DEFAULT_RULES if r[0] not in names)


def _as_axes(axes):
    return tuple(axes) if isinstance(axes, list) else axes


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules):
    """Make `mesh` and `rules` current, so the model's logical constraints apply while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def logical_to_shardings(logical_specs, mesh: Mesh, rules: Rules):
    """Pytree of logical PartitionSpecs (e.g. from nn.get_partition_spec) -> NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, tuple(rules))


def mesh_axes_for(name: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes a logical name maps to under `rules` (empty: replicated)."""
    for logical, axes in rules:
        if logical == name:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch is split: the product of the mesh axes 'batch' maps to."""
    return math.prod(mesh.shape[a] for a in mesh_axes_for("batch", rules))


def batch_sharding(mesh: Mesh, rules: Rules, microbatched: bool = False) -> NamedSharding:
    """Sharding of a token batch (B, T), or (grad_accum, B / grad_accum, T) if `microbatched`."""
    spec = nn.logical_to_mesh_axes(("batch", "length"), tuple(rules))
    if microbatched:
        spec = PartitionSpec(None, *spec)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_batch_slice(sharding: NamedSharding, global_shape: tuple[int, ...], batch_dim: int = 0) -> tuple[int, int]:
    """(index, count): this process feeds rows [index * n, (index + 1) * n) of the global batch,
    n = global rows / count. Processes whose devices hold the same rows (replicas along
    'tensor', say) get the same index, so each reads exactly the rows its devices need."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        s = idx[batch_dim]
        rows.add((s.start or 0, global_shape[batch_dim] if s.stop is None else s.stop))
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    size = stop - start
    covered = sum(b - a for a, b in sorted(rows))
    if covered != size or global_shape[batch_dim] % size or start % size:
        raise ValueError(f"this process's batch rows {sorted(rows)} are not one aligned block")
    return start // size, global_shape[batch_dim] // size


def indivisible(abstract_tree, shardings) -> list[str]:
    """Descriptions of arrays whose dimensions do not divide by the mesh axes they are sharded
    over (jit refuses such shardings); empty when every sharding is valid."""
    problems = []
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
    for (path, leaf), sharding in zip(flat, jax.tree_util.tree_leaves(shardings)):
        for dim, axes in zip(leaf.shape, sharding.spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            ways = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % ways:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                problems.append(f"{name} {tuple(leaf.shape)}: dimension {dim} is split {ways} ways over {'x'.join(axes)}")
    return problems


def device_summary(mesh: Mesh) -> str:
    kinds = sorted({d.device_kind for d in np.ravel(mesh.devices)})
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"mesh {shape} on {mesh.size} {'/'.join(kinds)} device(s), {jax.process_count()} process(es)"
