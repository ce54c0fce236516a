"""Token shards -> this host's batches of token windows, in an exact, checkpointable grain order.

A split (`train_*.bin` or `val_*.bin`, llm.c / modded-nanogpt format) is read as windows of
block_size + 1 tokens at stride block_size (neighbours share one token, like nanoGPT's x / y),
never crossing a shard boundary. Training order: window stream = epoch 0's permutation, then
epoch 1's, ... (each from the seed and the epoch, every window exactly once per epoch); global
batch k = stream[k * G : (k + 1) * G]; host p of P reads rows [p * G/P, (p + 1) * G/P) of it. So
the global batch does not depend on the number of hosts, and the iterator state is one number
(the next global batch) plus what the order depends on; it is the same on every host.

Prompt/completion data (shards with .mask files, see gpt2_jax/data/shards.py) is read as one example
per row instead of windows, padded, with weights 1 only on completion targets; pretraining
batches carry all-ones weights, so the trainer takes one path for both.

    it = make_train_iterator(path, block_size=1024, global_batch_size=512, seed=0)
    batch = to_global_batch(next(it), sharding)      # {"inputs", "targets"}: int32 [512, 1024], "weights"
    state = it.get_state()                           # small JSON-able dict; it.set_state(state)
"""

from __future__ import annotations

import functools
import hashlib
from typing import NamedTuple

import grain
import jax
import numpy as np

# DataError, load_shard, load_mask and shard_files live in the shard layer; callers may reach them here too
from gpt2_jax.data.shards import (
    COMPLETION,
    START,
    DataError,
    load_mask,
    load_shard,
    mask_file,
    shard_files,
)
from gpt2_jax.interop import paths
from gpt2_jax.interop.tokenizer import EOT_ID, VOCAB_SIZE

NUM_THREADS = 2  # threads reading batches ahead of the training step
PREFETCH_BATCHES = 4  # host batches kept ready


# --- windows --------------------------------------------------------------------------------


class Windows:
    """Random access to the windows of block_size + 1 tokens of one split, numbered shard by shard."""

    def __init__(self, path: str, split: str, block_size: int, vocab_size: int = VOCAB_SIZE):
        if block_size < 1:
            raise DataError(f"block_size must be at least 1, got {block_size}")
        self.files = shard_files(path, split)
        self.shards = [load_shard(f) for f in self.files]
        self.block_size, self.vocab_size = block_size, vocab_size
        self.counts = np.array([max(0, (len(s) - 1) // block_size) for s in self.shards], dtype=np.int64)
        self.ends = np.cumsum(self.counts)
        if self.ends[-1] == 0:
            longest = max(len(s) for s in self.shards)
            raise DataError(
                f"the {split} split in {path} is shorter than one window of block_size + 1 = "
                f"{block_size + 1} tokens (its longest shard has {longest:,}); use a smaller block_size or more data"
            )

    def __len__(self) -> int:
        return int(self.ends[-1])

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window ids -> (shard index, first token position in that shard)."""
        shard = np.searchsorted(self.ends, ids, side="right")
        return shard, (ids - (self.ends[shard] - self.counts[shard])) * self.block_size

    def read(self, ids: np.ndarray) -> np.ndarray:
        """int32 [len(ids), block_size + 1]: the windows' tokens, checked against the vocabulary."""
        shard, start = self.locate(np.asarray(ids, dtype=np.int64))
        out = np.empty((len(shard), self.block_size + 1), dtype=np.int32)
        for row, (s, a) in enumerate(zip(shard, start)):
            out[row] = self.shards[s][a : a + self.block_size + 1]
        if len(out) and out.max() >= self.vocab_size:
            self._raise_bad_token(out, shard, start)
        return out

    def _raise_bad_token(self, out: np.ndarray, shard: np.ndarray, start: np.ndarray):
        row, col = np.argwhere(out >= self.vocab_size)[0]
        raise DataError(
            f"{self.files[shard[row]]}: token id {out[row, col]} at position {start[row] + col:,} is >= the "
            f"vocabulary size {self.vocab_size}; these shards were made with another tokenizer"
        )


    def batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """inputs / targets int32 and weights float32 (all ones) [len(ids), block_size]."""
        tokens = self.read(ids)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones(tokens[:, 1:].shape, np.float32)}


class Examples:
    """Random access to the prompt/completion examples of one split (shards with .mask files):
    one example per row, padded after its end, weights 1 only on completion targets. Padding
    instead of packing: with one example per row, attention never sees another example, so
    nothing leaks between them; short fine-tuning examples waste some compute on padding."""

    def __init__(self, path: str, split: str, block_size: int, vocab_size: int = VOCAB_SIZE):
        self.files = shard_files(path, split)
        self.shards = [load_shard(f) for f in self.files]
        self.masks = [load_mask(mask_file(f), len(s)) for f, s in zip(self.files, self.shards)]
        self.block_size, self.vocab_size = block_size, vocab_size
        starts = [np.flatnonzero(np.asarray(m) == START) for m in self.masks]
        self.spans = np.array([(i, a, b) for i, (st, s) in enumerate(zip(starts, self.shards))
                               for a, b in zip(st, [*st[1:], len(s)])], dtype=np.int64).reshape(-1, 3)  # fmt: skip
        if not len(self.spans):
            raise DataError(f"the {split} split in {path} holds no examples")

    def __len__(self) -> int:
        return len(self.spans)

    def batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Each example's last block_size + 1 tokens (a longer prompt loses its start), then
        <|endoftext|> padding with weight 0."""
        T = self.block_size
        tokens = np.full((len(ids), T + 1), EOT_ID, dtype=np.int32)
        counted = np.zeros((len(ids), T + 1), dtype=np.float32)
        for row, (shard, a, b) in enumerate(self.spans[np.asarray(ids, np.int64)]):
            a = max(a, b - (T + 1))
            tokens[row, : b - a] = self.shards[shard][a:b]
            counted[row, : b - a] = self.masks[shard][a:b] == COMPLETION
        if tokens.max() >= self.vocab_size:
            raise DataError(f"token ids >= the vocabulary size {self.vocab_size} in {self.files[0]}...; "
                            "these shards were made with another tokenizer")  # fmt: skip
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": counted[:, 1:]}


def has_masks(path: str, split: str) -> bool:
    """True for prompt/completion data (prepare --completion_field): .mask files beside the shards."""
    return all(paths.exists(mask_file(f)) for f in shard_files(path, split))


def open_split(path: str, split: str, block_size: int, vocab_size: int = VOCAB_SIZE) -> Windows | Examples:
    """Examples for prompt/completion data, else windows of a token stream."""
    kind = Examples if has_masks(path, split) else Windows
    return kind(path, split, block_size, vocab_size)


def num_windows(path: str, block_size: int, split: str = "train") -> int:
    """Rows in one epoch of a split (windows, or examples): epochs = batches * global_batch_size / this."""
    return len(open_split(path, split, block_size))


# --- batches --------------------------------------------------------------------------------


def _train_batch(windows: Windows | Examples, ids: np.ndarray) -> dict[str, np.ndarray]:
    return windows.batch(ids)


def _eval_batch(windows: Windows | Examples, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Ids past the last row are padding rows: zero tokens and zero weights."""
    valid = ids < len(windows)
    T = windows.block_size
    out = {"inputs": np.zeros((len(ids), T), np.int32), "targets": np.zeros((len(ids), T), np.int32),
           "weights": np.zeros((len(ids), T), np.float32)}  # fmt: skip
    if valid.any():
        for k, v in windows.batch(ids[valid]).items():
            out[k][valid] = v
    return out


class HostShare(NamedTuple):
    """This host's part of every global batch: rows [index * rows, (index + 1) * rows)."""

    index: int
    count: int
    rows: int
    global_batch_size: int


def host_share(global_batch_size: int, process_index: int | None = None, process_count: int | None = None) -> HostShare:
    """Checks the layout; process index and count default to this JAX process's."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if not 0 <= p < n:
        raise DataError(f"process_index {p} is not in [0, process_count={n})")
    if global_batch_size < 1 or global_batch_size % n:
        raise DataError(f"global batch size {global_batch_size} must be a positive multiple of the {n} processes")
    return HostShare(p, n, global_batch_size // n, global_batch_size)


def _mix(seed: int) -> int:
    """A 32-bit shuffle seed that differs a lot between neighbouring user seeds (grain uses
    seed + epoch per epoch, so seeds 0 and 1 would otherwise share all but one epoch)."""
    return int.from_bytes(hashlib.blake2b(str(int(seed)).encode(), digest_size=4).digest(), "little")


class BatchIterator(grain.DatasetIterator):
    """This host's batches. State: {"next_batch": k, ...what the order depends on}, the same on
    every host and JSON-serialisable, so grain's Orbax handler or plain JSON can store it."""

    def __init__(self, parent: grain.DatasetIterator, *, num_windows: int, global_batch_size: int,
                 identity: dict, num_batches: int | None = None):  # fmt: skip
        super().__init__(parent)
        self.num_windows, self.global_batch_size = num_windows, global_batch_size
        self.num_batches = num_batches  # None: infinite
        self._identity = identity

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    @property
    def next_batch(self) -> int:
        """Index of the global batch that next() returns."""
        return grain.experimental.get_next_index(self._parent)

    @property
    def epoch(self) -> int:
        """The epoch that the next window read belongs to (0-based)."""
        return self.next_batch * self.global_batch_size // self.num_windows

    def get_state(self) -> dict:
        return {"next_batch": self.next_batch, **self._identity}

    def set_state(self, state: dict) -> None:
        changed = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in self._identity.items() if state.get(k) != v]
        if changed:
            raise DataError("cannot resume the data order, it changed since the checkpoint: " + "; ".join(changed))
        grain.experimental.set_next_index(self._parent, int(state["next_batch"]))


def _iterator(ids: grain.MapDataset, fn, windows: Windows, share: HostShare, identity: dict,
              num_batches: int | None, options: grain.ReadOptions) -> BatchIterator:  # fmt: skip
    """Window-id stream -> chunks of share.rows ids; host p of n takes chunks p, p + n, ... (its
    rows of every global batch) -> batches read ahead by a thread pool, returned in order."""
    ds = ids.batch(share.rows).slice(slice(share.index, None, share.count)).map(functools.partial(fn, windows))
    return BatchIterator(iter(ds.to_iter_dataset(options)), num_windows=len(windows),
                         global_batch_size=share.global_batch_size, identity=identity, num_batches=num_batches)  # fmt: skip


def make_train_iterator(path: str, *, block_size: int, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        split: str = "train", num_threads: int = NUM_THREADS,
                        prefetch_batches: int = PREFETCH_BATCHES, vocab_size: int = VOCAB_SIZE) -> BatchIterator:  # fmt: skip
    """Infinite shuffled training batches for this host: {"inputs", "targets"} int32 and "weights"
    float32 (ones; for prompt/completion data, ones on completion targets only), each
    [global_batch_size / process_count, block_size]. Epoch e is a permutation of all windows
    from (seed, e); a batch may span two epochs; nothing is dropped or repeated within an epoch."""
    windows = open_split(path, split, block_size, vocab_size)
    share = host_share(global_batch_size, process_index, process_count)
    ids = grain.MapDataset.range(len(windows)).shuffle(seed=_mix(seed)).repeat()
    identity = {"split": split, "seed": seed, "block_size": block_size,
                "global_batch_size": global_batch_size, "num_windows": len(windows)}  # fmt: skip
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return _iterator(ids, _train_batch, windows, share, identity, None, options)


def make_eval_iterator(path: str, *, block_size: int, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       split: str = "val", num_threads: int = NUM_THREADS,
                       prefetch_batches: int = PREFETCH_BATCHES, vocab_size: int = VOCAB_SIZE) -> BatchIterator:  # fmt: skip
    """One pass over the split's windows in order (finite: `it.num_batches` batches). The last
    global batch is padded with zero-token rows, so every window counts once: batches carry
    "weights" float32 [rows, block_size], 1 on real rows and 0 on padding."""
    windows = open_split(path, split, block_size, vocab_size)
    share = host_share(global_batch_size, process_index, process_count)
    num_batches = -(-len(windows) // global_batch_size)
    identity = {"split": split, "block_size": block_size, "global_batch_size": global_batch_size,
                "num_windows": len(windows)}  # fmt: skip
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    ids = grain.MapDataset.range(num_batches * global_batch_size)
    return _iterator(ids, _eval_batch, windows, share, identity, num_batches, options)


def to_global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """This host's rows -> global jax.Arrays (batch axis over all processes) placed by sharding."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
