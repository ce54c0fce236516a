"""The next token of each row from its logits, with that row's own temperature, top-k and top-p.

The settings are arrays, not compile-time constants, so one compiled decode step serves requests
with any mix of settings in one batch. temperature 0 is greedy; top_k 0 and top_p 1 turn those off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = float(jnp.finfo(jnp.float32).min)


def sample_rows(logits, keys, temperature, top_k, top_p):
    """One int32 token per row from float32 logits (B, V); keys: typed PRNG keys (B,); temperature,
    top_p: float (B,); top_k: int (B,). Each row's draw depends on its own key and logits only,
    so a seeded row samples the same whatever else shares its batch."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature > 0

    def draw(logits):
        scaled = logits / jnp.where(sampling, temperature, 1.0)[:, None]
        # sorting the vocabulary is the costly part: only when some sampling row filters
        filtering = jnp.any(sampling & ((top_k > 0) | (top_p < 1)))
        scaled = jax.lax.cond(filtering, _filter, lambda s, k, p: s, scaled, top_k, top_p)
        return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)

    # a greedy batch (the common case for evaluation) draws no random numbers at all
    drawn = jax.lax.cond(jnp.any(sampling), draw, lambda logits: greedy, logits)
    return jnp.where(sampling, drawn, greedy)


def _filter(logits, top_k, top_p):
    """Logits outside each row's top-k, and outside the smallest set of top tokens whose mass
    reaches top_p (always at least the top token), pushed to the lowest float32."""
    V = logits.shape[-1]
    ranked = -jnp.sort(-logits, axis=-1)  # (B, V), descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_top_k = jnp.arange(V)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, _NEG), axis=-1)
    keep = in_top_k & ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None])
    kept = jnp.maximum(keep.sum(-1), 1)
    threshold = jnp.take_along_axis(ranked, (kept - 1)[:, None], axis=-1)  # the smallest kept logit
    return jnp.where(logits < threshold, _NEG, logits)
