"""The decode-time KV cache: an empty one sized for a batch and a length, and its rows moved between caches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gpt2_jax.model.config import GPT2Config
from gpt2_jax.model.gpt2 import GPT2


def init_cache(config: GPT2Config, batch_size: int, max_length: int | None = None) -> dict:
    """An empty KV cache for `batch_size` sequences of up to `max_length` (default n_positions)
    tokens, in the compute dtype. Each row has its own position (where its next token goes), so
    rows at different lengths share a batch. Decoding past its end is an error (see Attention)."""
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


# Leaves holding each row's next position (B,); every other leaf is keys or values (B, L, H, Dh).
# With scanned layers (config.scan_layers) the blocks' leaves, under `h`, have a leading layer
# axis: (n_layer, B) and (n_layer, B, L, H, Dh).
_POSITION_LEAVES = ("index", "position")


def _is_position(path) -> bool:
    return getattr(path[-1], "key", None) in _POSITION_LEAVES


def _batch_axis(path) -> int:
    return 1 if getattr(path[0], "key", None) == "h" else 0


def _pad_length(x, length: int, axis: int):
    """`x` with its length axis `axis` padded with empty positions up to `length`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def set_positions(cache: dict, positions) -> dict:
    """The cache with row b's next token going to position positions[b] (B,). Rows prefilled with
    right-padded prompts continue after their own last token: the padding is overwritten, and
    masked until then."""
    positions = jnp.asarray(positions, jnp.int32)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.broadcast_to(positions, x.shape) if _is_position(path) else x, cache
    )


def insert_rows(cache: dict, rows: dict, slots) -> dict:
    """`cache` (B, L) with row j of `rows` (k, P <= L) written over row slots[j] (k,), positions
    included; a slot outside [0, B) is skipped (a padding row of `rows`)."""

    def put(path, big, small):
        ax = _batch_axis(path)
        if not _is_position(path):  # (k, P, ...) -> (k, L, ...): positions past P start empty
            small = _pad_length(small, big.shape[ax + 1], ax + 1)
        return big.at[(slice(None),) * ax + (slots,)].set(small, mode="drop")

    return jax.tree_util.tree_map_with_path(put, cache, rows)


def take_rows(cache: dict, rows, length: int) -> dict:
    """A cache of len(rows) rows, row j a copy of row rows[j] of `cache`, holding `length`
    positions (cut or padded with empty ones: the caller keeps every row's tokens inside)."""

    def take(path, x):
        ax = _batch_axis(path)
        x = jnp.take(x, rows, axis=ax)
        if _is_position(path):
            return x
        if length <= x.shape[ax + 1]:
            return jax.lax.slice_in_dim(x, 0, length, axis=ax + 1)
        return _pad_length(x, length, ax + 1)

    return jax.tree_util.tree_map_with_path(take, cache)
