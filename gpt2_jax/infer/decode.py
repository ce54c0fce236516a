"""The compiled decoding steps: prefill prompts into a cache, move rows between caches, decode a chunk of tokens on the device.

Module-level and jitted with the model config and the logical-axis rules static (GPT2Config is a
frozen, hashable dataclass; Flax's rules are read while tracing but are not part of jit's key, so
they are passed too): each step compiles once per process for each (config, rules, shapes). The
sampling settings are per-row arrays (Rows), so they never cause a compilation. The shapes are
bucketed (see the *_bucket functions), so a server compiles a bounded set of them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.infer.next_token import sample_rows
from gpt2_jax.interop.tokenizer import EOT_ID
from gpt2_jax.model import GPT2, GPT2Config, init_cache, lm_head
from gpt2_jax.model.cache import insert_rows, set_positions, take_rows

CACHE_MULTIPLE = 128  # cache lengths (and prompt buckets past this) are multiples of it
MIN_PROMPT_BUCKET = 8


class Rows(NamedTuple):
    """What the device needs to know about each row of a batch, all (B,) except key (B, key size)."""

    token: jax.Array  # int32: the row's last token, fed to the next step
    count: jax.Array  # int32: tokens generated so far (the row's random stream is key folded with it)
    remaining: jax.Array  # int32: tokens still to generate; 0 = the row is idle
    stop_at_eot: jax.Array  # bool: <|endoftext|> ends the row
    key: jax.Array  # uint32: the row's PRNG key data (jax.random.key_data)
    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off


def cache_length(config: GPT2Config, tokens: int) -> int:
    """KV-cache positions for sequences of `tokens` tokens: rounded up to CACHE_MULTIPLE. Each
    decode step reads the whole cache, so short generations should not pay for the full context."""
    return min(config.n_positions, -(-tokens // CACHE_MULTIPLE) * CACHE_MULTIPLE)


def prompt_bucket(config: GPT2Config, tokens: int) -> int:
    """The padded length a prompt of `tokens` tokens is prefilled at: a power of two up to
    CACHE_MULTIPLE, a multiple of it past that (so never longer than its cache_length)."""
    if tokens > CACHE_MULTIPLE:
        return cache_length(config, tokens)
    return min(config.n_positions, max(MIN_PROMPT_BUCKET, 1 << (tokens - 1).bit_length()))


def batch_bucket(rows: int, max_batch: int) -> int:
    """Rows of a batch of `rows` sequences: a power of two, at most max_batch."""
    return min(max_batch, 1 << (rows - 1).bit_length())


_STATIC = ("config", "rules")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill(params, prompts, lengths, rows: Rows, *, config: GPT2Config, rules: tuple):
    """Right-padded prompts (k, P) of `lengths` (k,) into a fresh (k, P) cache; sample each
    row's first new token from the logits at its own last prompt token."""
    k, P = prompts.shape
    with nn.logical_axis_rules(rules):
        hidden, state = GPT2(config).apply({"params": params, "cache": init_cache(config, k, P)}, prompts,
                                           decode=True, return_hidden=True, mutable=["cache"])  # fmt: skip
        last = hidden[jnp.arange(k), lengths - 1][:, None]  # (k, 1, D): the head runs on these only
        logits = lm_head(last, params["wte"], config)[:, 0]
    token = sample_rows(logits, _step_keys(rows), rows.temperature, rows.top_k, rows.top_p)
    return token, set_positions(state["cache"], lengths)


@functools.partial(jax.jit, donate_argnames="cache")
def _insert(cache, rows_cache, slots):
    return insert_rows(cache, rows_cache, slots)


@functools.partial(jax.jit, static_argnames="length")
def _regroup(cache, rows, *, length: int):
    return take_rows(cache, rows, length)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "chunk"), donate_argnames="cache")
def _decode(params, cache, rows: Rows, steps, *, config: GPT2Config, rules: tuple, chunk: int):
    """Up to `steps` (<= chunk) decode steps on the device, stopping early once no row has
    tokens left to generate. Returns the cache and the new tokens (B, chunk), -1 where a row
    generated none (idle, or done)."""
    B = rows.token.shape[0]

    def step(carry):
        t, cache, token, count, remaining, out = carry
        with nn.logical_axis_rules(rules):
            logits, state = GPT2(config).apply({"params": params, "cache": cache}, token[:, None], decode=True,
                                               mutable=["cache"])  # fmt: skip
        new = sample_rows(logits[:, -1], _step_keys(rows._replace(count=count)), rows.temperature, rows.top_k,
                          rows.top_p)  # fmt: skip
        active = remaining > 0
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(active, new, -1)[:, None], t, axis=1)
        ended = rows.stop_at_eot & (new == EOT_ID)
        remaining = jnp.where(active & ~ended, remaining - 1, 0)
        return t + 1, state["cache"], jnp.where(active, new, token), count + active, remaining, out

    def more(carry):
        t, *_, remaining, _ = carry
        return (t < steps) & jnp.any(remaining > 0)

    out = jnp.full((B, chunk), -1, jnp.int32)
    carry = (jnp.int32(0), cache, rows.token, rows.count, rows.remaining, out)
    _, cache, *_, out = jax.lax.while_loop(more, step, carry)
    return cache, out


def _step_keys(rows: Rows):
    """Each row's key for its next token: its own key folded with how many it has generated."""
    return jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(rows.key), rows.count)
