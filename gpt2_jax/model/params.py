"""Parameter trees of a GPT2Config: shapes without allocating, fresh initialisation, counts, logical axes."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

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
