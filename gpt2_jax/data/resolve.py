"""data.path -> a folder of token shards: a shard folder as it is; text or jsonl (a file, a folder, a glob) prepared into the cache on first use.

    folder = resolve.shard_folder("notes/*.txt")   # ~/.cache/gpt2_jax/prepared/_.txt-<hash>/

Raw inputs are prepared as `python -m gpt2_jax.prepare --val_fraction 0.1` would (a whole file per
document, jsonl's "text" field), into a cache folder named by the path and keyed by the inputs'
content: reused while every file is byte-for-byte the same, prepared again when one changes,
appears or goes. The validation split is whole documents by hash, else the stream's last 10%.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from typing import Callable

from gpt2_jax.data import cache, documents, pretraining, val_split
from gpt2_jax.errors import UserError
from gpt2_jax.interop import paths

VAL_FRACTION = 0.1  # nanoGPT's 90/10: the seeds' one-file users expect that much held out
RECIPE = 1  # part of the cache key: bump it when what preparation writes changes
_ONE_WORKER_BYTES = 8_000_000  # below this, spawning tokenizer processes costs more than it saves


def is_shard_folder(path: str) -> bool:
    """A folder with meta.json or any .bin file at its top (never text to prepare)."""
    return paths.isdir(path) and any(f == "meta.json" or f.endswith(".bin") for f in paths.listdir(path))


def shard_folder(path: str, say: Callable[[str], object] = print) -> str:
    """The folder of shards that `path` names, preparing raw inputs on first use; `say` gets the
    console lines (what is prepared or reused, the validation rule)."""
    if is_shard_folder(path) or (os.path.isdir(path) and not os.listdir(path)):
        return path  # an empty folder too: the loader's "no shards" error says what it looks for
    if paths.is_remote(path):
        raise UserError("on gs:// give a folder of token shards (prepare them locally, then upload the folder)")
    if not glob.has_magic(path) and not os.path.exists(path):
        raise UserError("not found (it is not a folder of token shards, nor a text / jsonl file, folder or glob)")
    files = documents.expand_inputs([path])
    if any(f.endswith(".bin") for f in files):
        raise UserError("names token shard files; give the folder that holds them")
    source = _source(path, files)
    out, built = cache.prepared(os.path.join("prepared", _name(path)), source, lambda out: _prepare(files, out, source, say))
    if not built:
        say(f"data: {out}, prepared from {path} (unchanged since)")
    with open(os.path.join(out, "meta.json")) as f:
        say(f"data: {val_split.describe(json.load(f))}")
    return out


def _name(path: str) -> str:
    """A readable, path-unique cache folder name: the path's last part and a hash of the whole."""
    absolute = os.path.abspath(path)
    slug = re.sub(r"[^\w.-]+", "_", os.path.basename(absolute.rstrip("/")))[:48] or "data"
    return f"{slug}-{hashlib.sha256(absolute.encode()).hexdigest()[:12]}"


def _content_sha256(files: list[str]) -> str:
    """One digest of every file's name and bytes, in input order (the order documents take)."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            digest.update(f"{os.path.abspath(file)}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\0".encode())
    return digest.hexdigest()


def _source(path: str, files: list[str]) -> dict:
    return {"data_path": os.path.abspath(path), "files": len(files), "content_sha256": _content_sha256(files),
            "doc_mode": "file", "field": "text", "val_fraction": VAL_FRACTION, "recipe": RECIPE}  # fmt: skip


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _prepare(files: list[str], out: str, source: dict, say: Callable[[str], object]) -> None:
    size = sum(os.path.getsize(f) for f in files)
    say(f"data: preparing {len(files):,} file(s), {size / 1e6:.1f} MB, into {out} (once: reused until they change)")
    start = time.perf_counter()
    workers = 1 if size < _ONE_WORKER_BYTES else _cores()
    total = None if any(f.endswith(".gz") for f in files) else size  # progress counts uncompressed bytes
    settings = pretraining.Settings(errors=None, val_fraction=VAL_FRACTION)  # errors None: no prepare-only hint
    chunks = pretraining.chunked(documents.text_docs(files, None, "file"))
    meta = pretraining.write_dataset(chunks, out, settings=settings, source=source, workers=workers,
                                     overwrite=True, total_bytes=total)  # fmt: skip
    t, v = meta["train"], meta["val"]
    say(f"data: train {t['documents']:,} docs, {t['tokens']:,} tokens; val {v['tokens']:,} tokens; "
        f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
