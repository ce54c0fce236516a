"""The prepared-data format on disk: llm.c token shards, their loss masks and meta.json, read and written atomically.

Token shard (llm.c / modded-nanogpt): 256 little-endian int32 header words [20240520, 1,
n_tokens, 0, ...], then n_tokens uint16. Mask sidecar `<split>_NNNNNN.mask` beside a token shard
of prompt/completion data: the same header with magic MASK_MAGIC, then one uint8 per token:
START on the <|endoftext|> that begins an example, PROMPT on prompt tokens, COMPLETION on
completion tokens and the closing <|endoftext|> (the targets the loss is taken on). A prepared
folder holds `train_*.bin`, `val_*.bin` (and .mask files) with `meta.json`, written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Iterator

import numpy as np

from gpt2_jax.errors import UserError
from gpt2_jax.interop import paths

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
MASK_MAGIC = 20240521
START, PROMPT, COMPLETION = 2, 0, 1
META_VERSION = 1
# Other llm.c files that share the header layout: say what they are rather than "bad magic number".
OTHER_MAGICS = {
    20240801: "an llm.c Llama-3 shard (magic 20240801: uint32 token ids of the Llama-3 tokenizer), not GPT-2 "
    "tokens; this trainer reads GPT-2 shards (magic 20240520, uint16): re-run llm.c's dev/data script with "
    "-m gpt-2 (its default), or prepare the text with python -m gpt2_jax.prepare",
    20240522: "an llm.c evaluation file (magic 20240522: HellaSwag / MMLU examples), not a token shard; "
    "move it out of the data folder",
}
DEFAULT_SHARD_SIZE = 100_000_000


class DataError(UserError, ValueError):
    """A problem with the token shards or the batch layout that the user can fix."""


# --- headers --------------------------------------------------------------------------------


def _header(magic: int, n_tokens: int) -> bytes:
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (magic, VERSION, n_tokens)
    return header.tobytes()


def shard_header(n_tokens: int) -> bytes:
    """The 1024-byte llm.c header for a uint16 GPT-2 shard of n_tokens tokens."""
    return _header(MAGIC, n_tokens)


def mask_header(n_tokens: int) -> bytes:
    """The 1024-byte header of the loss mask beside a shard of n_tokens tokens."""
    return _header(MASK_MAGIC, n_tokens)


# --- reading --------------------------------------------------------------------------------


def _shard_name(split: str) -> re.Pattern:
    """`[PREFIX_]<split>[_DIGITS].bin`: every naming llm.c's dev/data scripts and modded-nanogpt use."""
    return re.compile(rf"^(?:.*_)?{re.escape(split)}(?:_\d+)?\.bin$")


def accepted_names(split: str) -> str:
    return (f"{split}_NNNNNN.bin (prepare's), PREFIX_{split}_NNNNNN.bin (llm.c's and modded-nanogpt's FineWeb) "
            f"or PREFIX_{split}.bin (llm.c's tiny_shakespeare_{split}.bin, TinyStories_{split}.bin)")  # fmt: skip


def shard_files(path: str, split: str) -> list[str]:
    """Sorted shards of one split in path, by any llm.c naming (train_000000.bin,
    fineweb_train_000001.bin, tiny_shakespeare_train.bin)."""
    if not paths.isdir(path):
        raise DataError(f"data path {path} is not a folder; make one with python -m gpt2_jax.prepare")
    names = paths.listdir(path)  # local or gs://
    files = [f for f in names if _shard_name(split).match(f)]
    if not files:
        others = [f for f in names if f.endswith(".bin")]
        found = f" (its .bin files: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
        raise DataError(f"no {split} shards in {path}{found}; accepted names: {accepted_names(split)}; "
                        "make them with python -m gpt2_jax.prepare")  # fmt: skip
    return [paths.join(path, f) for f in files]


def mask_file(shard: str) -> str:
    """The loss mask's file beside a token shard: train_000000.bin -> train_000000.mask."""
    return shard[: -len(".bin")] + ".mask"


class RemoteArray:
    """A gs:// shard's values, read by byte range on each slice (never the whole object unless
    asked: `np.asarray` reads it all). Picklable: it holds only the path and shape."""

    def __init__(self, file: str, dtype, offset: int, n: int):
        self.file, self.dtype, self.offset, self.n = file, np.dtype(dtype), offset, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            return np.asarray(self)[index]
        a, b, _ = index.indices(self.n)
        if b <= a:
            return np.zeros(0, self.dtype)
        size = self.dtype.itemsize
        return np.frombuffer(paths.read_bytes(self.file, self.offset + a * size, (b - a) * size), self.dtype)

    def __array__(self, dtype=None, copy=None):
        out = self[0 : self.n]
        return out if dtype is None else out.astype(dtype)


def load_shard(file: str) -> np.ndarray:
    """Checks the llm.c header and memory-maps the shard's uint16 tokens (gs://: a RemoteArray
    that reads ranges)."""
    size = paths.size(file)
    raw = paths.read_bytes(file, 0, HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{file}: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) in OTHER_MAGICS:
        raise DataError(f"{file}: {OTHER_MAGICS[int(header[0])]}")
    if header[0] != MAGIC:
        raise DataError(f"{file}: not a token shard (magic number {header[0]}, expected {MAGIC})")
    if header[1] != VERSION:
        raise DataError(f"{file}: shard version {header[1]}; only version {VERSION} (uint16 GPT-2 tokens) is supported")
    n, have = int(header[2]), (size - HEADER_BYTES) // 2
    if not 0 <= n <= have:
        raise DataError(f"{file}: truncated: its header says {n:,} tokens but the file holds {have:,}")
    if n == 0:
        return np.zeros(0, dtype="<u2")
    if paths.is_remote(file):
        return RemoteArray(file, "<u2", HEADER_BYTES, n)
    return np.memmap(file, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def load_mask(file: str, n_tokens: int) -> np.ndarray:
    """Memory-maps the uint8 loss mask beside a token shard, checked against the shard's length."""
    header = np.frombuffer(paths.read_bytes(file, 0, HEADER_BYTES), dtype="<i4")
    if len(header) < 3 or header[0] != MASK_MAGIC or header[2] != n_tokens:
        raise DataError(f"{file}: not the loss mask of its {n_tokens:,}-token shard; re-run prepare")
    if paths.is_remote(file):
        return RemoteArray(file, np.uint8, HEADER_BYTES, n_tokens)
    return np.memmap(file, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


# --- writing --------------------------------------------------------------------------------


def _write(file: str, header: bytes, values: np.ndarray) -> None:
    with open(file, "wb") as f:
        f.write(header + values.tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_shard(file: str, tokens: np.ndarray) -> None:
    """One whole token shard (header + uint16 tokens)."""
    _write(file, shard_header(len(tokens)), np.asarray(tokens, dtype="<u2"))


def write_mask(file: str, mask: np.ndarray) -> None:
    """One whole loss mask (header + uint8 per token)."""
    _write(file, mask_header(len(mask)), np.asarray(mask, dtype=np.uint8))


def write_meta(folder: str, meta: dict) -> None:
    """meta.json, the last file of a prepared folder."""
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


class ShardWriter:
    """Appends tokens to <split>_NNNNNN.bin files of exactly shard_size tokens (the last: fewer)."""

    def __init__(self, folder: str, split: str, shard_size: int):
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.files: list[str] = []
        self.tokens = self.docs = 0
        self._sha = hashlib.sha256()
        self._f = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        self._sha.update(tokens.tobytes())
        self.tokens += len(tokens)
        while len(tokens):
            if self._f is None:
                self._open_shard()
            take = min(len(tokens), self.shard_size - self._in_shard)
            self._f.write(tokens[:take].tobytes())
            self._in_shard += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_size:
                self._close_shard()

    def close(self) -> None:
        if self._f is not None:
            self._close_shard()

    def summary(self) -> dict:
        return {
            "files": self.files,
            "tokens": self.tokens,
            "documents": self.docs,
            "sha256": self._sha.hexdigest(),
        }

    def _open_shard(self) -> None:
        name = f"{self.split}_{len(self.files):06d}.bin"
        self._f = open(os.path.join(self.folder, name), "wb")
        self._f.write(shard_header(0))
        self.files.append(name)
        self._in_shard = 0

    def _close_shard(self) -> None:
        self._f.seek(0)
        self._f.write(shard_header(self._in_shard))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None


# --- atomic output folders ------------------------------------------------------------------


def check_out(out: str, overwrite: bool) -> None:
    """Refuses an existing non-empty output folder unless --overwrite, and then only one that
    prepare made (it holds meta.json), so a mistyped --out never deletes unrelated files."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a folder")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it")
    if not os.path.exists(os.path.join(out, "meta.json")):
        raise UserError(f"--out {out} has files but no meta.json; --overwrite only replaces a prepare output")


def _move_into_place(tmp: str, out: str) -> None:
    """Renames tmp to out; an existing out (empty, or checked by check_out) is replaced."""
    old = None
    if os.path.isdir(out) and os.listdir(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "d"))
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parent(out: str) -> str | None:
    """Creates out's parent folder if needed; returns the topmost folder created (for cleanup)."""
    parent, created = os.path.dirname(out), None
    while not os.path.isdir(parent):
        created, parent = parent, os.path.dirname(parent)
    if created:
        os.makedirs(os.path.dirname(out))
    return created


@contextlib.contextmanager
def atomic_folder(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a new hidden folder beside `out`, renamed to `out` when the block ends. Any
    exception (Ctrl-C too) removes everything this made, parent folders included; an existing
    `out` is refused or, with overwrite, replaced only at the end (see check_out)."""
    check_out(out, overwrite)
    path = os.path.abspath(out)  # also drops a trailing slash, which would name the folder ""
    created = _make_parent(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is a normal folder
        yield tmp
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(created or tmp, ignore_errors=True)
        raise
