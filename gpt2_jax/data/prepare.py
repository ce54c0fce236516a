"""CLI: tokenize text files, jsonl files or a Hugging Face dataset into llm.c-format uint16 token shards.

    python -m gpt2_jax.prepare --input PATH [PATH ...] --out DIR [--format text|jsonl] [--field NAME]
                               [--hf_dataset NAME [--hf_config C] [--split S]] [--val_fraction F]
                               [--workers N] [--doc_mode file|line|blank_line] [--errors strict|replace]
                               [--shard_size N] [--overwrite]

Every document is preceded by <|endoftext|> (50256). A document goes to the validation split when
the hash of its text falls below --val_fraction, so the split is deterministic, independent of
input order and worker count, and identical documents always land on the same side; when no
document does (one file, say), the last --val_fraction of the token stream is held out. Shards are
`train_NNNNNN.bin` / `val_NNNNNN.bin`: 256 little-endian int32 header words [20240520, 1, n_tokens,
0, ...] then n_tokens uint16 (llm.c / modded-nanogpt format), with `meta.json` beside them.
This module is the command line only: inputs come from documents.py, pretraining shards from
pretraining.py, prompt/completion shards from pairs.py, the formats from shards.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from gpt2_jax.cli import USER_ERRORS, first_line
from gpt2_jax.data import pairs
from gpt2_jax.data.documents import (
    DOC_MODES,
    expand_inputs,
    file_kind,
    hf_docs,
    hf_rows,
    jsonl_rows,
    text_docs,
)
from gpt2_jax.data.pretraining import (
    DEFAULT_VAL_FRACTION,
    Settings,
    chunked,
    write_dataset,
)
from gpt2_jax.data.shards import DEFAULT_SHARD_SIZE, check_out
from gpt2_jax.data.val_split import describe, tiny_warning
from gpt2_jax.errors import UserError


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
                   help=f"fraction held out for validation: of the documents, else of the tokens (default: {DEFAULT_VAL_FRACTION})")  # fmt: skip
    p.add_argument("--workers", type=int, default=_cores(), metavar="N",
                   help="tokenizer processes (default: all cores)")  # fmt: skip
    p.add_argument("--doc_mode", choices=DOC_MODES, default="file",
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
        docs, files, total = hf_docs(args.hf_dataset, args.hf_config, args.split, args.field), None, None
    else:
        files = expand_inputs(args.input, skip=args.out)
        docs, total = text_docs(files, args.format, args.doc_mode), _total_bytes(files)
    return write_dataset(chunked(docs), args.out, settings=settings, source=_source(args, files),
                         shard_size=args.shard_size, workers=args.workers, overwrite=args.overwrite,
                         total_bytes=total)  # fmt: skip


def _run_pairs(args) -> dict:
    if not args.completion_field:
        raise UserError("--template needs --completion_field G (the field the loss is taken on)")
    if args.block_size < 2:
        raise UserError(f"--block_size must be at least 2, got {args.block_size}")
    if args.template:
        pairs.template_fields(args.template)  # a malformed template fails before anything is read
    if args.hf_dataset:
        rows, files = hf_rows(args.hf_dataset, args.hf_config, args.split), None
    else:
        files = expand_inputs(args.input, skip=args.out)
        if any(file_kind(f, args.format) != "jsonl" for f in files):
            raise UserError("prompt/completion examples are read from jsonl files (--format jsonl) or --hf_dataset")
        rows = jsonl_rows(files, args.errors)
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


def _notes(meta: dict, val_fraction: float) -> list[str]:
    """What stderr says about the validation split: its rule when by position, empty or tiny splits."""
    val, unit = meta["val"], "example" if meta.get("loss_mask") else "document"
    notes = [f"note: {describe(meta)}"] if meta.get("val_rule") == "positions" else []
    if val["tokens"] == 0 and val_fraction > 0:  # prompt/completion examples are never cut in two
        n = meta["train"]["documents"]
        advice = (f"one {unit} cannot be split; add {unit}s" if n < 2 else
                  f"add {unit}s or raise --val_fraction (the chance that each goes to validation)")  # fmt: skip
        notes.append(f"warning: the validation split is empty ({n:,} {unit}(s) at --val_fraction {val_fraction}); {advice}")
    tiny = tiny_warning(val["tokens"])
    return notes + ([f"warning: {tiny}"] if tiny else [])


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
        meta = run(args)
    except USER_ERRORS as e:  # UserError, and paths that cannot be made (e.g. --out under a file)
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    for line in _notes(meta, args.val_fraction):
        print(line, file=sys.stderr)
    print(_report(meta, args.out, time.perf_counter() - start))
    return 0

