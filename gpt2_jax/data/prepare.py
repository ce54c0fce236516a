"""CLI: tokenize text files, jsonl files or a Hugging Face dataset into llm.c-format uint16 token shards.

    python -m gpt2_jax.prepare --input PATH [PATH ...] --out DIR [--format text|jsonl] [--field NAME]
                               [--hf_dataset NAME [--hf_config C] [--split S]] [--val_fraction F]
                               [--workers N] [--doc_mode file|line|blank_line] [--errors strict|replace]
                               [--shard_size N] [--overwrite]

Every document is preceded by <|endoftext|> (50256). A document goes to the validation split when
the hash of its text falls below --val_fraction, so the split is deterministic, independent of
input order and worker count, and identical documents always land on the same side. Shards are
`train_NNNNNN.bin` / `val_NNNNNN.bin`: 256 little-endian int32 header words [20240520, 1, n_tokens,
0, ...] then n_tokens uint16 (llm.c / modded-nanogpt format), with `meta.json` beside them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from gpt2_jax.errors import UserError
from gpt2_jax.interop.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
DEFAULT_SHARD_SIZE = 100_000_000
DEFAULT_VAL_FRACTION = 0.01
CHUNK_BYTES = 1 << 20  # input text per worker task: large enough to amortise IPC, small for balance
META_VERSION = 1
_BOM = b"\xef\xbb\xbf"



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


# --- header ---------------------------------------------------------------------------------


def shard_header(n_tokens: int) -> bytes:
    """The 1024-byte llm.c header for a uint16 GPT-2 shard of n_tokens tokens."""
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, n_tokens)
    return header.tobytes()


# --- workers: raw document -> text -> tokens ------------------------------------------------


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic per-document split: the first 8 bytes of blake2b(text) below the fraction."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def _decode(source: str, line: int, payload: bytes, errors: str) -> str:
    try:
        return payload.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        where = line + payload.count(b"\n", 0, e.start)
        raise UserError(
            f"{source}:{where}: not valid UTF-8 (byte 0x{payload[e.start]:02x}); "
            "pass --errors replace to replace undecodable bytes with U+FFFD"
        ) from None


def _json_text(source: str, line: int, raw: bytes, settings: Settings) -> str | None:
    text = _decode(source, line, raw, settings.errors)
    if not text.strip():
        return None  # blank line between records
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}:{line}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{source}:{line}: not a JSON object but {type(record).__name__}")
    if settings.field not in record:
        fields = ", ".join(sorted(record)[:20]) or "none"
        raise UserError(
            f"{source}:{line}: no field {settings.field!r} (fields: {fields}); choose one with --field"
        )
    return _check_str(source, line, record[settings.field], settings.field)


def _check_str(source: str, line: int, value, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    where = f"{source}:{line}" if line else source
    raise UserError(f"{where}: field {field!r} is {type(value).__name__}, not a string")


def _doc_text(kind: str, source: str, line: int, payload, settings: Settings) -> str | None:
    if kind == "text":
        return _decode(source, line, payload, settings.errors)
    if kind == "jsonl":
        return _json_text(source, line, payload, settings)
    return _check_str(source, line, payload, settings.field)


def tokenize_chunk(chunk: Chunk, settings: Settings) -> Tokenized:
    """Runs in a worker: decode, filter empty documents, tokenize, assign each document a split."""
    enc = get_tokenizer()
    streams = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    n_bytes = 0
    for source, line, payload in chunk.docs:
        n_bytes += len(payload) if payload is not None else 0
        text = _doc_text(chunk.kind, source, line, payload, settings)
        if text is None or not text.strip():
            continue
        split = "val" if is_val(text, settings.val_fraction) else "train"
        streams[split].append(EOT_ID)
        streams[split].extend(enc.encode_ordinary(text))
        docs[split] += 1
    arrays = {k: np.array(v, dtype="<u2") for k, v in streams.items()}
    return Tokenized(arrays["train"], arrays["val"], docs["train"], docs["val"], n_bytes)


# --- main process: inputs -> chunks ---------------------------------------------------------


def _walk(folder: str, skip: str | None) -> list[str]:
    """Regular files under folder, recursively, sorted, skipping hidden files and folders and the
    folder `skip` (the output, so that re-running into a subfolder never reads its own shards)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        keep = (d for d in dirs if not d.startswith(".") and not _same(os.path.join(root, d), skip))
        dirs[:] = sorted(keep)
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    return found


def _same(path: str, other: str | None) -> bool:
    return other is not None and os.path.realpath(path) == os.path.realpath(other)


def expand_inputs(paths: Iterable[str], skip: str | None = None) -> list[str]:
    """Files, folders (recursive) and globs -> a de-duplicated list of files in a stable order."""
    files = []
    for path in paths:
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise UserError(f"no files match {path!r}")
            files += [f for m in matches for f in (_walk(m, skip) if os.path.isdir(m) else [m])]
        elif os.path.isdir(path):
            files += _walk(path, skip)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"input not found: {path}")
    unique = list(dict.fromkeys(files, None))
    if not unique:
        raise UserError(f"no input files: the folders given are empty ({' '.join(paths)})")
    return unique


def file_kind(path: str, fmt: str | None) -> str:
    """'jsonl' or 'text': --format if given, else by extension (.jsonl, .jsonl.gz)."""
    if fmt:
        return fmt
    return "jsonl" if path.endswith((".jsonl", ".jsonl.gz")) else "text"


def _open(path: str):
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _read_all(path: str, f) -> bytes:
    try:
        data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return data[len(_BOM) :] if data.startswith(_BOM) else data


def _lines(path: str, f) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its terminator), BOM stripped from the first line."""
    try:
        for number, line in enumerate(f, 1):
            if number == 1 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            yield number, line.rstrip(b"\r\n")
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _paragraphs(lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """Groups lines into documents separated by blank lines: (first line number, text)."""
    start, block = 0, []
    for number, line in lines:
        if line.strip():
            start = start if block else number
            block.append(line)
        elif block:
            yield start, b"\n".join(block)
            block = []
    if block:
        yield start, b"\n".join(block)


def file_docs(path: str, kind: str, doc_mode: str) -> Iterator[tuple[str, str, int, bytes]]:
    """(kind, source, line, payload) for every raw document in one file."""
    with _open(path) as f:
        if kind == "jsonl":
            yield from ((kind, path, n, line) for n, line in _lines(path, f))
        elif doc_mode == "file":
            yield kind, path, 1, _read_all(path, f)
        elif doc_mode == "line":
            yield from ((kind, path, n, line) for n, line in _lines(path, f))
        else:
            yield from ((kind, path, n, text) for n, text in _paragraphs(_lines(path, f)))


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


def text_chunks(files: list[str], fmt: str | None, doc_mode: str) -> Iterator[Chunk]:
    docs = (d for path in files for d in file_docs(path, file_kind(path, fmt), doc_mode))
    return chunked(docs)


def _load_hf(name: str, config: str | None, split: str):
    import datasets  # slow import; only when asked for

    saved = any(os.path.exists(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json"))
    try:
        ds = datasets.load_from_disk(name) if saved else datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types; the first line says what went wrong
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load dataset {name!r}: {first}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"dataset {name!r} has no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds


def hf_chunks(name: str, config: str | None, split: str, field: str) -> Iterator[Chunk]:
    """Documents from a Hugging Face dataset (hub name or local folder), in row order."""
    ds = _load_hf(name, config, split)
    if field not in ds.column_names:
        raise UserError(
            f"dataset {name!r} has no field {field!r} (fields: {', '.join(ds.column_names)}); "
            "choose one with --field"
        )
    if len(ds) == 0:
        raise UserError(f"input is empty: dataset {name!r} split {split!r} has no rows")
    rows = (row for batch in ds.select_columns([field]).iter(batch_size=1000) for row in batch[field])
    return chunked(("str", f"{name}[{i}]", 0, value) for i, value in enumerate(rows))


# --- writing --------------------------------------------------------------------------------


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
    writers = {s: ShardWriter(folder, s, shard_size) for s in ("train", "val")}
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
    parent, created = os.path.dirname(os.path.abspath(out)), None
    while not os.path.isdir(parent):
        created, parent = parent, os.path.dirname(parent)
    if created:
        os.makedirs(os.path.dirname(os.path.abspath(out)))
    return created


def write_dataset(chunks: Iterable[Chunk], out: str, *, settings: Settings, source: dict,
                  shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1, overwrite: bool = False,
                  total_bytes: int | None = None) -> dict:  # fmt: skip
    """Tokenizes chunks into shards + meta.json in a temporary folder, then renames it to out.
    A failure (or Ctrl-C) removes everything this call created. Returns the meta dict."""
    check_out(out, overwrite)
    created = _make_parent(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is a normal folder
        splits, n_bytes = _tokenize_into(tmp, chunks, settings, shard_size, workers, total_bytes)
        meta = _meta(splits, n_bytes, settings, source, shard_size)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(created or tmp, ignore_errors=True)
        raise
    return meta


def _meta(splits: dict, n_bytes: int, settings: Settings, source: dict, shard_size: int) -> dict:
    if splits["train"]["documents"] + splits["val"]["documents"] == 0:
        if n_bytes == 0:
            raise UserError("input is empty (0 bytes)")
        raise UserError("no documents after filtering: every document is empty or whitespace")
    if splits["train"]["documents"] == 0:
        raise UserError(f"no training documents: all went to validation; lower --val_fraction ({settings.val_fraction})")
    from gpt2_jax import __version__

    return {
        "format": "llm.c token shards: 256 little-endian int32 header words [20240520, 1, n_tokens, 0, ...], "
        "then n_tokens uint16; every document is preceded by <|endoftext|>",
        "meta_version": META_VERSION,
        "tokenizer": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "eot_token": EOT_ID,
        "shard_size": shard_size,
        "val_fraction": settings.val_fraction,
        "errors": settings.errors,
        "source": source,
        "input_bytes": n_bytes,
        "train": splits["train"],
        "val": splits["val"],
        "prepared_by": f"gpt2_jax {__version__}",
    }


# --- CLI ------------------------------------------------------------------------------------


def _cores() -> int:
    """Cores this process may use (the affinity mask respects container limits)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the CLI contract
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m gpt2_jax.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", metavar="PATH", help="text/jsonl files, folders (recursive) or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and meta.json")
    p.add_argument("--format", choices=["text", "jsonl"], help="default: jsonl for *.jsonl[.gz], else text")
    p.add_argument("--field", default="text", help="jsonl / dataset field holding the text (default: text)")
    p.add_argument("--hf_dataset", metavar="NAME", help="Hugging Face dataset: hub name or local folder")
    p.add_argument("--hf_config", metavar="C", help="dataset configuration name")
    p.add_argument("--split", default="train", metavar="S", help="dataset split to read (default: train)")
    p.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help=f"fraction of documents held out for validation (default: {DEFAULT_VAL_FRACTION})")  # fmt: skip
    p.add_argument("--workers", type=int, default=_cores(), metavar="N",
                   help="tokenizer processes (default: all cores)")  # fmt: skip
    p.add_argument("--doc_mode", choices=["file", "line", "blank_line"], default="file",
                   help="text documents: a whole file (default), each line, or blank-line separated")  # fmt: skip
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="non-UTF-8 text: stop with an error (default) or replace with U+FFFD")  # fmt: skip
    p.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help=f"tokens per shard (default: {DEFAULT_SHARD_SIZE:,})")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    pairs = p.add_argument_group("fine-tuning examples (loss on the completion only; see gpt2_jax/data/pairs.py)")
    pairs.add_argument("--completion_field", metavar="G", help="jsonl / dataset field of the completion")
    pairs.add_argument("--prompt_field", default="prompt", metavar="F", help="field of the prompt (default: prompt)")
    pairs.add_argument("--template", metavar="T", help='prompt built from fields, e.g. "{dialogue}\\nTL;DR: "')
    pairs.add_argument("--block_size", type=int, default=1024, metavar="N",
                       help="longest example in tokens; longer prompts lose their start (default: 1024)")  # fmt: skip
    return p


def _check_args(args) -> None:
    if bool(args.input) == bool(args.hf_dataset):
        raise UserError("give exactly one of --input PATH ... or --hf_dataset NAME")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if not 1 <= args.shard_size < 2**31:
        raise UserError(f"--shard_size must be in [1, 2**31), got {args.shard_size}")


def _source(args, files: list[str] | None) -> dict:
    if args.hf_dataset:
        keys = ("hf_dataset", "hf_config", "split", "field")
    else:
        keys = ("input", "format", "field", "doc_mode")
    source = {k: getattr(args, k) for k in keys}
    if files is not None:
        source["files"] = len(files)
    return source


def _total_bytes(files: list[str]) -> int | None:
    if any(f.endswith(".gz") for f in files):
        return None  # progress counts uncompressed bytes
    return sum(os.path.getsize(f) for f in files)


def run(args) -> dict:
    """Validates arguments and inputs (before writing anything), then writes the dataset."""
    _check_args(args)
    check_out(args.out, args.overwrite)
    if args.completion_field or args.template:
        return _run_pairs(args)
    settings = Settings(args.errors, args.field, args.val_fraction)
    if args.hf_dataset:
        chunks, files, total = hf_chunks(args.hf_dataset, args.hf_config, args.split, args.field), None, None
    else:
        files = expand_inputs(args.input, skip=args.out)
        chunks, total = text_chunks(files, args.format, args.doc_mode), _total_bytes(files)
    return write_dataset(chunks, args.out, settings=settings, source=_source(args, files),
                         shard_size=args.shard_size, workers=args.workers, overwrite=args.overwrite,
                         total_bytes=total)  # fmt: skip


def _run_pairs(args) -> dict:
    from gpt2_jax.data import pairs

    if not args.completion_field:
        raise UserError("--template needs --completion_field G (the field the loss is taken on)")
    if args.block_size < 2:
        raise UserError(f"--block_size must be at least 2, got {args.block_size}")
    if args.template:
        pairs.template_fields(args.template)  # a malformed template fails before anything is read
    if args.hf_dataset:
        rows, files = pairs.hf_rows(args.hf_dataset, args.hf_config, args.split), None
    else:
        files = expand_inputs(args.input, skip=args.out)
        if any(file_kind(f, args.format) != "jsonl" for f in files):
            raise UserError("prompt/completion examples are read from jsonl files (--format jsonl) or --hf_dataset")
        rows = pairs.jsonl_rows(files)
    examples = (pairs.make_pair(where, row, args.prompt_field, args.completion_field, args.template)
                for where, row in rows)  # fmt: skip
    source = {**_source(args, files), "prompt_field": args.prompt_field, "completion_field": args.completion_field,
              "template": args.template}  # fmt: skip
    return pairs.write_pairs(examples, args.out, block_size=args.block_size, val_fraction=args.val_fraction,
                             shard_size=args.shard_size, source=source, overwrite=args.overwrite)  # fmt: skip


def _report(meta: dict, out: str, seconds: float) -> str:
    parts = []
    for split in ("train", "val"):
        s = meta[split]
        parts.append(f"{split} {s['documents']:,} docs, {s['tokens']:,} tokens in {len(s['files'])} shard(s)")
    if meta.get("loss_mask"):
        cut = meta["train"]["truncated_prompts"] + meta["val"]["truncated_prompts"]
        return (f"wrote {out}: {'; '.join(parts).replace('docs', 'examples')}; {cut:,} prompt(s) cut from the left "
                f"to fit {meta['block_size']} tokens; loss on completions only; in {seconds:.1f} s")  # fmt: skip
    mb = meta["input_bytes"] / 1e6
    return f"wrote {out}: {'; '.join(parts)}; {mb:.1f} MB in {seconds:.1f} s ({mb / max(seconds, 1e-9):.1f} MB/s)"


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
        meta = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    if meta["val"]["documents"] == 0 and args.val_fraction > 0:
        print(f"warning: the validation split is empty ({meta['train']['documents']} document(s) at "
              f"--val_fraction {args.val_fraction}); use more documents, --doc_mode line|blank_line "
              "or a larger --val_fraction", file=sys.stderr)  # fmt: skip
    print(_report(meta, args.out, time.perf_counter() - start))
    return 0

