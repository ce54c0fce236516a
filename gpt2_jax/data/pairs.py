"""Prompt/completion examples -> token shards with a per-token loss mask (prepare's fine-tuning mode).

Each example is <|endoftext|> + prompt + completion + <|endoftext|>, the texts encoded as plain
text (a literal "<|endoftext|>" in them is text, as in pretraining). Beside every llm.c token
shard `<split>_NNNNNN.bin` goes `<split>_NNNNNN.mask` (format: gpt2_jax/data/shards.py): START
on the <|endoftext|> that begins an example, PROMPT on prompt tokens, COMPLETION on completion
tokens and the closing <|endoftext|> (the tokens the loss is taken on). Shards split only
between examples. The token shards stay llm.c-compatible. The held-out examples also go to
val_pairs.jsonl, which read_pairs reads back for ROUGE.
"""

from __future__ import annotations

import json
import os
import string
from typing import Iterable, NamedTuple

import numpy as np

from gpt2_jax.data import documents, shards
from gpt2_jax.data.pretraining import is_val
from gpt2_jax.data.shards import COMPLETION, MASK_MAGIC, PROMPT, START
from gpt2_jax.errors import UserError
from gpt2_jax.interop.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer

FORMAT = ("prompt/completion examples: llm.c token shards <split>_NNNNNN.bin, each example "
          "<|endoftext|> prompt completion <|endoftext|>; beside each, <split>_NNNNNN.mask: 256 int32 header "
          f"words [{MASK_MAGIC}, 1, n_tokens, 0, ...], then n_tokens uint8: {START} = an example's first "
          f"<|endoftext|>, {PROMPT} = prompt, {COMPLETION} = completion and its closing <|endoftext|> (the loss is "
          "taken on targets marked 1)")  # fmt: skip


class Pair(NamedTuple):
    where: str  # file:line or dataset[i], for messages
    prompt: str
    completion: str


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as e:
        raise UserError(f"--template {template!r}: {e}") from None


def make_pair(where: str, row: dict, prompt_field: str, completion_field: str, template: str | None) -> Pair:
    """The prompt text (the template filled from the row, or the prompt field) and completion."""
    needed = [completion_field] + (template_fields(template) if template else [prompt_field])
    for field in needed:
        if field not in row:
            raise UserError(f"{where} lacks the field {field!r} (fields: {', '.join(map(str, row))})")
        if not isinstance(row[field], str):
            raise UserError(f"{where}: field {field!r} is {type(row[field]).__name__}, not text")
    prompt = template.format(**{f: row[f] for f in needed[1:]}) if template else row[prompt_field]
    return Pair(where, prompt, row[completion_field])


def read_pairs(path: str, prompt_field: str = "prompt", completion_field: str = "completion",
               template: str | None = None) -> list[dict]:  # fmt: skip
    """{"prompt", "completion"} rows of a jsonl file (prepare writes DIR/val_pairs.jsonl); with
    `template`, the prompt is the template filled from each row's fields."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist")
    return [make_pair(where, row, prompt_field, completion_field, template)._asdict()
            for where, row in documents.jsonl_rows([path])]  # fmt: skip


class Encoded(NamedTuple):
    tokens: np.ndarray  # uint16
    mask: np.ndarray  # uint8
    truncated: bool


def encode(pair: Pair, block_size: int) -> Encoded:
    """Tokens and mask of one example, at most block_size + 1 tokens (one training window): a
    longer prompt loses tokens from its start; a completion that cannot fit is an error."""
    enc = get_tokenizer()
    prompt = enc.encode_ordinary(pair.prompt)  # text is text: a literal "<|endoftext|>" is not the EOT token
    completion = enc.encode_ordinary(pair.completion) + [EOT_ID]
    room = block_size + 1 - 1 - len(completion)  # the leading <|endoftext|> takes one place
    if room < 0:
        raise UserError(f"{pair.where}: the completion alone ({len(completion)} tokens with its end token) does "
                        f"not fit in a block of {block_size} tokens; raise --block_size")  # fmt: skip
    truncated = len(prompt) > room
    prompt = prompt[len(prompt) - room :] if truncated else prompt
    tokens = np.array([EOT_ID, *prompt, *completion], dtype="<u2")
    mask = np.array([START] + [PROMPT] * len(prompt) + [COMPLETION] * len(completion), dtype=np.uint8)
    return Encoded(tokens, mask, truncated)


class PairWriter:
    """<split>_NNNNNN.bin + .mask of at most shard_size tokens each, split between examples."""

    def __init__(self, folder: str, split: str, shard_size: int):
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.files: list[str] = []
        self.tokens = self.examples = self.truncated = 0
        self._parts: list[Encoded] = []
        self._in_shard = 0
        self.pairs: list[Pair] = []  # kept for the split's pairs jsonl

    def add(self, pair: Pair, e: Encoded) -> None:
        if self._in_shard and self._in_shard + len(e.tokens) > self.shard_size:
            self._flush()
        self._parts.append(e)
        self._in_shard += len(e.tokens)
        self.tokens += len(e.tokens)
        self.examples += 1
        self.truncated += e.truncated
        self.pairs.append(pair)

    def close(self) -> None:
        if self._parts:
            self._flush()

    def _flush(self) -> None:
        name = f"{self.split}_{len(self.files):06d}"
        tokens = np.concatenate([p.tokens for p in self._parts])
        mask = np.concatenate([p.mask for p in self._parts])
        shards.write_shard(os.path.join(self.folder, name + ".bin"), tokens)
        shards.write_mask(os.path.join(self.folder, name + ".mask"), mask)
        self.files.append(name + ".bin")
        self._parts, self._in_shard = [], 0

    def summary(self) -> dict:
        return {"files": self.files, "tokens": self.tokens, "documents": self.examples,
                "truncated_prompts": self.truncated}  # fmt: skip


def write_pairs(pairs: Iterable[Pair], out: str, *, block_size: int, val_fraction: float, shard_size: int,
                source: dict, overwrite: bool = False) -> dict:  # fmt: skip
    """Shards + masks + meta.json + val_pairs.jsonl (the held-out prompts and completions, for
    ROUGE) in a temporary folder renamed to `out` at the end. Returns the meta dict."""
    with shards.atomic_folder(out, overwrite) as tmp:
        writers = {s: PairWriter(tmp, s, shard_size) for s in ("train", "val")}
        for pair in pairs:
            split = "val" if is_val(pair.prompt + "\0" + pair.completion, val_fraction) else "train"
            writers[split].add(pair, encode(pair, block_size))
        for w in writers.values():
            w.close()
        meta = _meta(writers, block_size, val_fraction, shard_size, source)
        with open(os.path.join(tmp, "val_pairs.jsonl"), "w") as f:
            for p in writers["val"].pairs:
                f.write(json.dumps({"prompt": p.prompt, "completion": p.completion}) + "\n")
        shards.write_meta(tmp, meta)
    return meta


def _meta(writers: dict, block_size: int, val_fraction: float, shard_size: int, source: dict) -> dict:
    train, val = writers["train"].summary(), writers["val"].summary()
    if train["documents"] + val["documents"] == 0:
        raise UserError("input is empty: no examples")
    if train["documents"] == 0:
        raise UserError(f"no training examples: all went to validation; lower --val_fraction ({val_fraction})")
    from gpt2_jax import __version__

    return {
        "format": FORMAT, "meta_version": shards.META_VERSION, "loss_mask": True, "tokenizer": "gpt2",
        "vocab_size": VOCAB_SIZE, "eot_token": EOT_ID, "block_size": block_size, "shard_size": shard_size,
        "val_fraction": val_fraction, "source": source, "train": train, "val": val,
        "prepared_by": f"gpt2_jax {__version__}",
    }  # fmt: skip
