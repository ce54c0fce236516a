"""Raw documents -> a folder of token shards (prepare's pretraining path), tokenized on a pool of worker processes.

Every document is preceded by <|endoftext|> (50256). A document goes to the validation split when
the hash of its text falls below val_fraction, so the split is deterministic, independent of
input order and worker count, and identical documents always land on the same side. When that
leaves validation empty (one document, say), it is the token stream's last val_fraction (val_split.py).

    chunks = chunked(documents.text_docs(files, None, "file"))
    meta = write_dataset(chunks, "data/mine", settings=Settings(), source={"input": files}, workers=4)
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import multiprocessing
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from gpt2_jax.data import documents, shards, val_split
from gpt2_jax.errors import UserError
from gpt2_jax.interop.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer

DEFAULT_VAL_FRACTION = 0.01
CHUNK_BYTES = 1 << 20  # input text per worker task: large enough to amortise IPC, small for balance


class Settings(NamedTuple):
    """How workers turn raw documents into tokens."""

    errors: str = "strict"  # UTF-8 decoding: strict | replace
    field: str = "text"  # jsonl / HF field holding the text
    val_fraction: float = DEFAULT_VAL_FRACTION


class Chunk(NamedTuple):
    """One worker task: documents of one kind ('text' bytes, 'jsonl' line bytes, 'str' values)."""

    kind: str
    docs: list  # (source, line, payload)


class Tokenized(NamedTuple):
    """A worker's result for one chunk, already split into train and val token streams."""

    train: np.ndarray
    val: np.ndarray
    train_docs: int
    val_docs: int
    n_bytes: int


# --- workers: raw document -> text -> tokens ------------------------------------------------


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic per-document split: the first 8 bytes of blake2b(text) below the fraction."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def tokenize_chunk(chunk: Chunk, settings: Settings) -> Tokenized:
    """Runs in a worker: decode, filter empty documents, tokenize, assign each document a split."""
    enc = get_tokenizer()
    streams = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    n_bytes = 0
    for source, line, payload in chunk.docs:
        n_bytes += len(payload) if payload is not None else 0
        text = documents.doc_text(chunk.kind, source, line, payload, settings.errors, settings.field)
        if text is None or not text.strip():
            continue
        split = "val" if is_val(text, settings.val_fraction) else "train"
        streams[split].append(EOT_ID)
        streams[split].extend(enc.encode_ordinary(text))
        docs[split] += 1
    arrays = {k: np.array(v, dtype="<u2") for k, v in streams.items()}
    return Tokenized(arrays["train"], arrays["val"], docs["train"], docs["val"], n_bytes)


def chunked(docs: Iterable[tuple[str, str, int, object]]) -> Iterator[Chunk]:
    """Groups (kind, source, line, payload) into worker tasks of about CHUNK_BYTES of one kind."""
    kind, batch, size = None, [], 0
    for doc_kind, source, line, payload in docs:
        if batch and (doc_kind != kind or size >= CHUNK_BYTES):
            yield Chunk(kind, batch)
            batch, size = [], 0
        kind = doc_kind
        batch.append((source, line, payload))
        size += len(payload) if payload is not None else 0
    if batch:
        yield Chunk(kind, batch)


def ordered_map(fn, items: Iterable, workers: int) -> Iterator:
    """fn over items in input order: in-process for 1 worker, else a spawn pool (safe beside JAX
    threads) with at most 2 tasks per worker in flight, so big inputs are never read ahead."""
    if workers == 1:
        yield from map(fn, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --- main process: tokens -> shards ---------------------------------------------------------


def _progress(total_bytes: int | None):
    from tqdm import tqdm

    return tqdm(
        total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
        disable=None, dynamic_ncols=True,
    )  # fmt: skip


def _append(writers: dict, r: Tokenized) -> None:
    for split, tokens, docs in (("train", r.train, r.train_docs), ("val", r.val, r.val_docs)):
        writers[split].write(tokens)
        writers[split].docs += docs


def _counts(writers: dict) -> str:
    docs = sum(w.docs for w in writers.values())
    tokens = sum(w.tokens for w in writers.values())
    return f"docs={docs:,} tokens={tokens:,}"


def _tokenize_into(folder: str, chunks: Iterable[Chunk], settings: Settings, shard_size: int,
                   workers: int, total_bytes: int | None) -> tuple[dict, int]:  # fmt: skip
    """Shards of both splits in folder; returns their summaries and the input bytes read."""
    writers = {s: shards.ShardWriter(folder, s, shard_size) for s in ("train", "val")}
    fn = functools.partial(tokenize_chunk, settings=settings)
    n_bytes = 0
    with _progress(total_bytes) as bar, contextlib.closing(ordered_map(fn, chunks, workers)) as results:
        for r in results:
            _append(writers, r)
            n_bytes += r.n_bytes
            bar.update(r.n_bytes)
            bar.set_postfix_str(_counts(writers), refresh=False)
    for w in writers.values():
        w.close()
    return {s: w.summary() for s, w in writers.items()}, n_bytes


def write_dataset(chunks: Iterable[Chunk], out: str, *, settings: Settings, source: dict,
                  shard_size: int = shards.DEFAULT_SHARD_SIZE, workers: int = 1, overwrite: bool = False,
                  total_bytes: int | None = None) -> dict:  # fmt: skip
    """Tokenizes chunks into shards + meta.json in a temporary folder, then renames it to out.
    A failure (or Ctrl-C) removes everything this call created. Returns the meta dict."""
    with shards.atomic_folder(out, overwrite) as tmp:
        splits, n_bytes = _tokenize_into(tmp, chunks, settings, shard_size, workers, total_bytes)
        _check(splits, n_bytes, settings)
        rule = val_split.val_rule(splits, settings.val_fraction)
        if rule == "positions":  # whole documents gave no validation split: never leave it silently empty
            splits = val_split.by_position(tmp, splits, settings.val_fraction, shard_size)
        meta = _meta(splits, n_bytes, settings, source, shard_size, rule)
        shards.write_meta(tmp, meta)
    return meta


def _check(splits: dict, n_bytes: int, settings: Settings) -> None:
    if splits["train"]["documents"] + splits["val"]["documents"] == 0:
        if n_bytes == 0:
            raise UserError("input is empty (0 bytes)")
        raise UserError("no documents after filtering: every document is empty or whitespace")
    if splits["train"]["documents"] == 0:
        raise UserError(f"no training documents: all went to validation; lower --val_fraction ({settings.val_fraction})")


def _meta(splits: dict, n_bytes: int, settings: Settings, source: dict, shard_size: int, rule: str) -> dict:
    from gpt2_jax import __version__

    return {
        "format": "llm.c token shards: 256 little-endian int32 header words [20240520, 1, n_tokens, 0, ...], "
        "then n_tokens uint16; every document is preceded by <|endoftext|>",
        "meta_version": shards.META_VERSION,
        "tokenizer": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "eot_token": EOT_ID,
        "shard_size": shard_size,
        "val_fraction": settings.val_fraction,
        "val_rule": rule,  # documents (by hash) | positions (the stream's last val_fraction) | none
        "errors": settings.errors,
        "source": source,
        "input_bytes": n_bytes,
        "train": splits["train"],
        "val": splits["val"],
        "prepared_by": f"gpt2_jax {__version__}",
    }
