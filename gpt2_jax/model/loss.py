"""Next-token losses: weighted cross-entropy sums over full logits, or over chunks of positions (no full logits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt2_jax.model.config import GPT2Config
from gpt2_jax.model.gpt2 import GPT2, lm_head


def cross_entropy_sums(logits, targets, weights=None):
    """(sum of weights x next-token NLL, sum of weights) in float32; no weights: all 1."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = logz - target_logit
    if weights is None:
        return nll.sum(), jnp.asarray(nll.size, jnp.float32)
    weights = weights.astype(jnp.float32)
    return (nll * weights).sum(), weights.sum()


def _mean(sums):
    total, count = sums
    return total / jnp.maximum(count, 1.0)  # all weights 0: loss 0 rather than NaN


def cross_entropy(logits, targets, weights=None):
    """Mean next-token loss in float32. logits (B, T, V), targets int (B, T), weights (B, T)."""
    return _mean(cross_entropy_sums(logits, targets, weights))


def chunked_loss_sums(hidden, wte, targets, weights, cfg: GPT2Config):
    """cross_entropy_sums(lm_head(hidden, wte, cfg), targets, weights), computed cfg.loss_chunk
    positions at a time, so float32 logits exist for one chunk of (B, loss_chunk) positions
    only. Each chunk is rematerialised in the backward pass (one extra head matmul, 2·V·D
    FLOPs per token) rather than keeping its logits. A sequence that does not divide into
    chunks is padded with weight-0 positions."""
    B, T, D = hidden.shape
    C = min(cfg.loss_chunk, T)
    n = -(-T // C)
    weights = jnp.ones((B, T), jnp.float32) if weights is None else weights.astype(jnp.float32)
    count = weights.sum()
    if n * C != T:
        pad = ((0, 0), (0, n * C - T))
        hidden = jnp.pad(hidden, pad + ((0, 0),))
        targets, weights = jnp.pad(targets, pad), jnp.pad(weights, pad)

    def chunks(x):  # (B, n*C, ...) -> (n, B, C, ...)
        return jnp.swapaxes(x.reshape(B, n, C, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_sum(h, y, w):
        return cross_entropy_sums(lm_head(h, wte, cfg), y, w)[0]

    def body(total, xs):
        return total + chunk_sum(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(targets), chunks(weights)))
    return total, count


def loss_sums(model: GPT2, params, inputs, targets, weights=None, *, deterministic=True, rngs=None):
    """(sum of weights x NLL, sum of weights) of `model` on one batch: through full logits, or
    chunk by chunk when model.config.loss_chunk > 0 (same value, less memory)."""
    cfg = model.config
    variables = {"params": params}
    if cfg.loss_chunk > 0:
        hidden = model.apply(variables, inputs, deterministic=deterministic, rngs=rngs, return_hidden=True)
        return chunked_loss_sums(hidden, params["wte"], targets, weights, cfg)
    logits = model.apply(variables, inputs, deterministic=deterministic, rngs=rngs)
    return cross_entropy_sums(logits, targets, weights)


def loss_fn(model: GPT2, params, inputs, targets, weights=None, *, deterministic=True, rngs=None):
    """Mean (or weighted mean) next-token cross-entropy of `model` with `params` on one batch."""
    return _mean(loss_sums(model, params, inputs, targets, weights, deterministic=deterministic, rngs=rngs))


