"""Parameter trees of a GPT2Config: shapes without allocating, fresh initialisation, counts, logical axes, layouts."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.model.config import GPT2Config
from gpt2_jax.model.gpt2 import GPT2


def abstract_params(config: GPT2Config, boxed: bool = False):
    """Parameter shapes/dtypes via jax.eval_shape (nothing allocated), the same under any mesh
    and axis rules in force; logical boxes if `boxed`."""
    with nn.logical_axis_rules(()):  # shapes only: no sharding constraint applies
        variables = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
        params = variables["params"]
        return params if boxed else nn.unbox(params)


def init_params(config: GPT2Config, rng) -> dict:
    """Freshly initialised float32 parameters (unboxed)."""
    variables = GPT2(config).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.unbox(variables["params"])


def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def logical_axes(config: GPT2Config):
    """Pytree of logical axis-name tuples matching the parameter pytree."""
    return nn.get_partition_spec(abstract_params(config, boxed=True))


def _stack(*xs):
    return (np if all(isinstance(x, np.ndarray) for x in xs) else jnp).stack(xs)


def stack_layers(params: dict, n_layer: int) -> dict:
    """Unrolled params (h_0 ... h_{L-1}) -> scanned (one `h`, each leaf with a leading layer axis)."""
    rest = {k: v for k, v in params.items() if not k.startswith("h_")}
    return {**rest, "h": jax.tree_util.tree_map(_stack, *[params[f"h_{i}"] for i in range(n_layer)])}


def unstack_layers(params: dict) -> dict:
    """Scanned params (`h` stacked on a leading layer axis) -> unrolled (h_0 ... h_{L-1})."""
    rest = {k: v for k, v in params.items() if k != "h"}
    n_layer = jax.tree_util.tree_leaves(params["h"])[0].shape[0]
    return {**rest, **{f"h_{i}": jax.tree_util.tree_map(lambda x: x[i], params["h"]) for i in range(n_layer)}}


def to_layout(params: dict, config: GPT2Config) -> dict:
    """`params` in any layout this code has stored (unrolled or scanned layers; c_attn flat
    (D, 3*D), as before the head-major layout, or (D, 3, H, Dh)) -> the layout `config` builds."""
    if "h" in params and not config.scan_layers:
        params = unstack_layers(params)
    elif "h" not in params and config.scan_layers:
        params = stack_layers(params, config.n_layer)
    head_major = (3, config.n_head, config.head_dim)

    def fix(path, x):
        names = [getattr(k, "key", None) for k in path]
        if "c_attn" in names and x.shape[-len(head_major) :] != head_major:  # flat: (..., 3*D)
            return x.reshape(*x.shape[:-1], *head_major)
        return x

    return jax.tree_util.tree_map_with_path(fix, params)
