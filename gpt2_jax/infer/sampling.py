"""Sampling continuations of a batch of prompts from GPT-2 params (greedy, temperature, top-k, top-p) on the decoding engine."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.infer.engine import Batch, Request
from gpt2_jax.infer.next_token import sample_rows
from gpt2_jax.interop.tokenizer import EOT_ID
from gpt2_jax.model import GPT2Config


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
    """One token per row from float32 logits (B, V), every row with the same settings (one key
    split over the rows)."""
    B = logits.shape[0]
    return sample_rows(logits, jax.random.split(rng, B), jnp.full(B, sampling.temperature, jnp.float32),
                       jnp.full(B, sampling.top_k, jnp.int32), jnp.full(B, sampling.top_p, jnp.float32))  # fmt: skip


# Nothing joins a Sampler's batch, so its chunks can be long: as long as a terminal that shows the
# stream may wait between bursts of tokens.
STREAM_SECONDS = 0.25


class Sampler:
    """Greedy or sampled continuations of a batch of prompts, on the decoding engine (engine.py):
    the prompts prefill together, then the token loop runs on the device, a chunk of steps per
    dispatch. The cache holds prompt + max_new_tokens rounded up to a multiple of
    CACHE_MULTIPLE (at most n_positions): each decode step reads the whole cache, so a short
    generation should not pay for the full context.

    The steps are compiled once per process for each (model config, logical-axis rules, shapes),
    not per Sampler nor per sampling setting: a new Sampler, other settings, or new `params` of
    the same shapes (the trainer sets them at every sample) compile nothing."""

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
        """Yield the next token of each row (B,) one step at a time; prompt is int (B, T0); a row
        that has ended at <|endoftext|> (if `stop_at_eot`) repeats it. Stops once every row has."""
        prompt = np.asarray(prompt, np.int32)
        self.check_length(prompt.shape[1], max_new_tokens)
        s = self.sampling
        requests = [Request(row.tolist(), max_new_tokens, s.temperature, s.top_k, s.top_p, key, stop_at_eot)
                    for row, key in zip(prompt, _row_keys(rng, len(prompt)))]  # fmt: skip
        batch = Batch(self.config, self.params, len(requests), _current_rules(), exact=True,
                      chunk_seconds=STREAM_SECONDS)  # fmt: skip
        batch.admit(requests)
        sent = 0
        while True:
            ongoing = [len(r.tokens) for r in requests if r.finish_reason is None]
            ready = min(ongoing) if ongoing else max(len(r.tokens) for r in requests)
            for i in range(sent, ready):
                yield np.asarray([r.tokens[i] if i < len(r.tokens) else EOT_ID for r in requests], np.int32)
            sent = ready
            if not ongoing:
                return
            batch.step()

    def generate(self, prompt: np.ndarray, max_new_tokens: int, rng, stop_at_eot: bool = True) -> list[list[int]]:
        """New tokens for each row of `prompt` (B, T0), cut after the first <|endoftext|>
        (which is kept) when `stop_at_eot`."""
        steps = list(self.stream(prompt, max_new_tokens, rng, stop_at_eot))
        rows = np.stack(steps, axis=1).tolist() if steps else [[] for _ in range(len(prompt))]
        return [_cut_at_eot(r) if stop_at_eot else r for r in rows]


def _row_keys(rng, rows: int) -> np.ndarray:
    """Key data for each row: `rng` split, so the rows of a batch draw differently."""
    keys = jax.random.split(rng, rows)
    return np.asarray(jax.random.key_data(keys) if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys)


def _current_rules() -> tuple:
    """The current logical-axis rules, hashable (a rule's mesh axes may be given as a list)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in nn.get_logical_axis_rules())


def _cut_at_eot(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOT_ID) + 1] if EOT_ID in tokens else tokens
