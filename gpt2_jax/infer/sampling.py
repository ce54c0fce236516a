"""Autoregressive sampling from GPT-2 params with a fixed-size KV cache (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.interop.tokenizer import EOT_ID
from gpt2_jax.model import GPT2, GPT2Config, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. temperature 0 is greedy; top_k 0 and top_p 1 turn those off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits, rng, sampling: SamplingConfig):
    """One token per row from float32 logits (B, V)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= sampling.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Sampler:
    """Greedy or sampled continuations of prompts, with a KV cache. The cache holds prompt +
    max_new_tokens rounded up to a multiple of CACHE_MULTIPLE (at most n_positions): each
    decode step reads the whole cache, so a short generation should not pay for the full
    context, and lengths in one bucket share one compiled decode step.

    The prefill and decode steps are compiled once per process for each (model config,
    sampling settings, logical-axis rules, shapes), not per Sampler: a new Sampler, or new
    `params` of the same shapes (the trainer sets them at every sample), compiles nothing."""

    def __init__(self, config: GPT2Config, params, sampling: SamplingConfig = SamplingConfig()):
        self.config, self.params, self.sampling = config, params, sampling

    def check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        limit = self.config.n_positions
        if max_new_tokens < 1 or max_new_tokens >= limit:
            raise ValueError(f"max_new_tokens must be between 1 and {limit - 1} (the context is {limit} tokens)")
        if prompt_length < 1 or prompt_length + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                f"{limit}-token context"
            )

    def stream(self, prompt: np.ndarray, max_new_tokens: int, rng, stop_at_eot: bool = True) -> Iterator[np.ndarray]:
        """Yield the next token of each row (B,) one step at a time; prompt is int (B, T0).
        Stops early once every row has produced <|endoftext|> (if `stop_at_eot`)."""
        prompt = np.asarray(prompt, np.int32)
        self.check_length(prompt.shape[1], max_new_tokens)
        cache = init_cache(self.config, prompt.shape[0], cache_length(self.config, prompt.shape[1] + max_new_tokens))
        keys = jax.random.split(rng, max_new_tokens)
        static = {"config": self.config, "sampling": self.sampling, "rules": _current_rules()}
        token, cache = _prefill(self.params, cache, jnp.asarray(prompt), keys[0], **static)
        done = np.zeros(prompt.shape[0], bool)
        for i in range(max_new_tokens):
            host = np.asarray(token)
            yield host
            done |= host == EOT_ID
            if (stop_at_eot and done.all()) or i + 1 == max_new_tokens:
                return
            token, cache = _decode(self.params, cache, token, keys[i + 1], **static)

    def generate(self, prompt: np.ndarray, max_new_tokens: int, rng, stop_at_eot: bool = True) -> list[list[int]]:
        """New tokens for each row of `prompt` (B, T0), cut after the first <|endoftext|>
        (which is kept) when `stop_at_eot`."""
        steps = list(self.stream(prompt, max_new_tokens, rng, stop_at_eot))
        rows = np.stack(steps, axis=1).tolist() if steps else [[] for _ in range(len(prompt))]
        return [_cut_at_eot(r) if stop_at_eot else r for r in rows]


# Module-level, with the settings as static arguments (GPT2Config and SamplingConfig are frozen,
# hashable dataclasses): jit's cache then keys on what the computation depends on. Flax's
# logical-axis rules are read while tracing but are not part of jit's key, so they are passed too.
_STATIC = ("config", "sampling", "rules")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill(params, cache, prompt, rng, *, config: GPT2Config, sampling: SamplingConfig, rules: tuple):
    """Run the prompt (B, T0) through the model into the cache; sample the first new token."""
    with nn.logical_axis_rules(rules):
        logits, state = GPT2(config).apply({"params": params, "cache": cache}, prompt, decode=True, mutable=["cache"])
    return sample_next(logits[:, -1], rng, sampling), state["cache"]


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames="cache")
def _decode(params, cache, token, rng, *, config: GPT2Config, sampling: SamplingConfig, rules: tuple):
    """Feed the last token (B,) through the cache; sample the next one."""
    with nn.logical_axis_rules(rules):
        logits, state = GPT2(config).apply(
            {"params": params, "cache": cache}, token[:, None], decode=True, mutable=["cache"]
        )
    return sample_next(logits[:, -1], rng, sampling), state["cache"]


def _current_rules() -> tuple:
    """The current logical-axis rules, hashable (a rule's mesh axes may be given as a list)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in nn.get_logical_axis_rules())


CACHE_MULTIPLE = 128


def cache_length(config: GPT2Config, tokens: int) -> int:
    """KV-cache positions for sequences of `tokens` tokens: rounded up to CACHE_MULTIPLE."""
    return min(config.n_positions, -(-tokens // CACHE_MULTIPLE) * CACHE_MULTIPLE)


def _cut_at_eot(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOT_ID) + 1] if EOT_ID in tokens else tokens
