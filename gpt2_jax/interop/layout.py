"""Restoring arrays a checkpoint stored under an older shape of the same size (c_attn's flat (D, 3*D) before the head-major (D, 3, H, Dh))."""

from __future__ import annotations

import math
from typing import Callable

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def stored_shapes(item_dir: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path (as names) -> shape of every array an Orbax item folder (e.g. checkpoints/4/state) holds."""
    meta = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
    flat, _ = jax.tree_util.tree_flatten_with_path(getattr(meta, "tree", meta))
    return {_names(p): tuple(m.shape) for p, m in flat if hasattr(m, "shape")}


def as_stored(abstract, item_dir: str, prefix: tuple[str, ...] = ()) -> tuple[object, Callable]:
    """(`abstract` with each leaf that `item_dir` stores under another shape of the same size asked
    for in the stored shape, replicated; a function that puts a restored tree back into
    `abstract`'s shapes and shardings). Memory order is unchanged, so a reshape is the whole
    conversion. `prefix`: where `abstract` sits in the stored tree (e.g. ('params',)).
    Without such leaves (every checkpoint since the head-major layout) both are identities."""
    try:
        stored = stored_shapes(item_dir)
    except Exception:  # unreadable metadata: the restore itself reports the damage
        return abstract, lambda tree: tree

    def ask(path, a):
        shape = stored.get(prefix + _names(path))
        if shape is None or shape == tuple(a.shape) or math.prod(shape) != math.prod(a.shape):
            return a
        sharding = getattr(a, "sharding", None)
        if isinstance(sharding, NamedSharding):  # keep the leading axis's split where it is the same dimension
            spec = sharding.spec
            lead = spec[0] if len(spec) and shape and shape[0] == a.shape[0] else None
            sharding = NamedSharding(sharding.mesh, PartitionSpec(lead))
        return jax.ShapeDtypeStruct(shape, a.dtype, sharding=sharding)

    asked = jax.tree_util.tree_map_with_path(ask, abstract)
    if all(x.shape == a.shape for x, a in zip(jax.tree_util.tree_leaves(asked), jax.tree_util.tree_leaves(abstract))):
        return abstract, lambda tree: tree

    def back(tree):
        def fix(x, a):
            if tuple(x.shape) == tuple(a.shape):
                return x
            sharding = getattr(a, "sharding", None)
            x = x.reshape(a.shape)
            return jax.device_put(x, sharding) if sharding is not None else x

        return jax.tree_util.tree_map(fix, tree, abstract)

    return asked, back
