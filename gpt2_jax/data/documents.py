"""Input documents: text and jsonl files (found, opened, split into documents) and Hugging Face dataset rows.

A raw document is a tuple (kind, source, line, payload): kind 'text' (payload: bytes of text),
'jsonl' (bytes of one jsonl line) or 'str' (a dataset value); source and line say where it came
from, for messages. doc_text turns one into text; that runs in prepare's worker processes.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterable, Iterator

from gpt2_jax.errors import UserError

DOC_MODES = ("file", "line", "blank_line")  # a text file is one document, one per line, or per paragraph
_BOM = b"\xef\xbb\xbf"
_ERRORS_HINT = "; pass --errors replace to replace undecodable bytes with U+FFFD"


# --- finding inputs -------------------------------------------------------------------------


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


# --- reading files --------------------------------------------------------------------------


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


def text_docs(files: list[str], fmt: str | None, doc_mode: str) -> Iterator[tuple[str, str, int, bytes]]:
    """The raw documents of many files, in order (kinds by file_kind)."""
    return (d for path in files for d in file_docs(path, file_kind(path, fmt), doc_mode))


# --- raw document -> text -------------------------------------------------------------------


def decode(source: str, line: int, payload: bytes, errors: str | None) -> str:
    """UTF-8 text; errors 'strict' / 'replace' (prepare's --errors; None: strict, and the
    message does not suggest the option)."""
    try:
        return payload.decode("utf-8", errors or "strict")
    except UnicodeDecodeError as e:
        where = line + payload.count(b"\n", 0, e.start)
        hint = _ERRORS_HINT if errors else ""
        raise UserError(f"{source}:{where}: not valid UTF-8 (byte 0x{payload[e.start]:02x}){hint}") from None


def json_record(source: str, line: int, text: str) -> dict | None:
    """The JSON object on one jsonl line; None for a blank line."""
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}:{line}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{source}:{line}: not a JSON object but {type(record).__name__}")
    return record


def _check_str(source: str, line: int, value, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    where = f"{source}:{line}" if line else source
    raise UserError(f"{where}: field {field!r} is {type(value).__name__}, not a string")


def _record_text(source: str, line: int, record: dict, field: str) -> str | None:
    if field not in record:
        fields = ", ".join(sorted(record)[:20]) or "none"
        raise UserError(f"{source}:{line}: no field {field!r} (fields: {fields}); choose one with --field")
    return _check_str(source, line, record[field], field)


def doc_text(kind: str, source: str, line: int, payload, errors: str, field: str) -> str | None:
    """A raw document's text (None: nothing there): decoded with `errors`, from `field` of a record."""
    if kind == "text":
        return decode(source, line, payload, errors)
    if kind == "jsonl":
        record = json_record(source, line, decode(source, line, payload, errors))
        return None if record is None else _record_text(source, line, record, field)
    return _check_str(source, line, payload, field)


def jsonl_rows(files: list[str], errors: str | None = None) -> Iterator[tuple[str, dict]]:
    """(file:line, record) for every record of jsonl files (plain or .gz), blank lines skipped."""
    for path in files:
        with _open(path) as f:
            for n, raw in _lines(path, f):
                record = json_record(path, n, decode(path, n, raw, errors))
                if record is not None:
                    yield f"{path}:{n}", record


# --- Hugging Face datasets ------------------------------------------------------------------


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


def hf_docs(name: str, config: str | None, split: str, field: str) -> Iterator[tuple[str, str, int, object]]:
    """Raw documents ('str', name[i], 0, value) of one field of a Hugging Face dataset (hub name
    or local folder), in row order; the dataset is loaded and checked before this returns."""
    ds = _load_hf(name, config, split)
    if field not in ds.column_names:
        raise UserError(
            f"dataset {name!r} has no field {field!r} (fields: {', '.join(ds.column_names)}); "
            "choose one with --field"
        )
    if len(ds) == 0:
        raise UserError(f"input is empty: dataset {name!r} split {split!r} has no rows")
    values = (v for batch in ds.select_columns([field]).iter(batch_size=1000) for v in batch[field])
    return (("str", f"{name}[{i}]", 0, value) for i, value in enumerate(values))


def hf_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    """(name[i], row) for every row of a Hugging Face dataset; loaded before this returns."""
    ds = _load_hf(name, config, split)
    return ((f"{name}[{i}]", row) for i, row in enumerate(ds))
