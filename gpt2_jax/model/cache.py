"""The decode-time KV cache: an empty one sized for a batch and a length."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gpt2_jax.model.config import GPT2Config
from gpt2_jax.model.gpt2 import GPT2


def init_cache(config: GPT2Config, batch_size: int, max_length: int | None = None) -> dict:
    """An empty KV cache for `batch_size` sequences of up to `max_length` (default n_positions)
    tokens, in the compute dtype. Decoding past its end is an error (see Attention)."""
    length = config.n_positions if max_length is None else max_length
    if not 1 <= length <= config.n_positions:
        raise ValueError(f"a KV cache holds between 1 and the {config.n_positions} positions of the model, "
                         f"not {length}")  # fmt: skip
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), _cache_shapes(config, batch_size, length))


@functools.lru_cache(maxsize=64)
def _cache_shapes(config: GPT2Config, batch_size: int, length: int) -> dict:
    # Traced once per shape, not at every generate call (tracing a large model's init is not free).
    tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    return jax.eval_shape(lambda t: GPT2(config).init(jax.random.key(0), t, decode=True), tokens)["cache"]
