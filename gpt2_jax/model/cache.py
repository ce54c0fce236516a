"""The decode-time KV cache: an empty one sized for a batch and a length."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt2_jax.model.config import GPT2Config
from gpt2_jax.model.gpt2 import GPT2


def init_cache(config: GPT2Config, batch_size: int, max_length: int | None = None) -> dict:
    """An empty KV cache for `batch_size` sequences of up to `max_length` (default n_positions)
    tokens, in the compute dtype."""
    length = max_length or config.n_positions
    tokens = jnp.zeros((batch_size, length), jnp.int32)
    shapes = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), tokens, decode=True))["cache"]
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


