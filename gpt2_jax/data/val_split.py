"""Validation by position: when whole documents give no validation split, the last val_fraction of the token stream becomes one (nanoGPT's rule).

Documents go to validation by a hash of their text (pretraining.is_val). One document, or a few
whose hashes all fall above val_fraction, leave validation empty; then the training stream is
cut instead, the last val_fraction of its tokens becoming the validation split (nanoGPT's 90/10
by position). meta.json's "val_rule" says which: "documents", "positions" or "none" (fraction 0).
"""

from __future__ import annotations

import os

import numpy as np

from gpt2_jax.data import shards
from gpt2_jax.interop.tokenizer import EOT_ID

TINY_VAL_TOKENS = 10_000  # below this a mean loss moves by several percent with the sample: say so
_COPY_TOKENS = 1 << 24  # tokens moved at a time when re-cutting, so memory stays bounded


def val_rule(splits: dict, val_fraction: float) -> str:
    """The rule the split will follow: 'none', 'documents' or (validation left empty) 'positions'."""
    if val_fraction == 0:
        return "none"
    return "documents" if splits["val"]["tokens"] else "positions"


def _write(writer: shards.ShardWriter, tokens: np.ndarray) -> None:
    writer.write(tokens)
    writer.docs += int(np.count_nonzero(tokens == EOT_ID))  # documents that start in this split


def by_position(folder: str, splits: dict, val_fraction: float, shard_size: int) -> dict:
    """Re-cuts folder's train shards (validation empty) into train + the last val_fraction of the
    stream as val (at least one token each side); returns the new summaries of both splits."""
    whole = []
    for i, name in enumerate(splits["train"]["files"]):
        whole.append(os.path.join(folder, f".whole_{i:06d}.bin"))
        os.rename(os.path.join(folder, name), whole[-1])
    n = splits["train"]["tokens"]
    n_train = n - min(n - 1, max(1, round(n * val_fraction)))
    writers = {s: shards.ShardWriter(folder, s, shard_size) for s in ("train", "val")}
    pos = 0
    for file in whole:
        tokens = shards.load_shard(file)
        for start in range(0, len(tokens), _COPY_TOKENS):
            chunk = np.asarray(tokens[start : start + _COPY_TOKENS])
            cut = min(max(n_train - pos, 0), len(chunk))
            _write(writers["train"], chunk[:cut])
            _write(writers["val"], chunk[cut:])
            pos += len(chunk)
        del tokens
        os.remove(file)
    for w in writers.values():
        w.close()
    return {s: w.summary() for s, w in writers.items()}


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def describe(meta: dict) -> str:
    """One line: which rule made the validation split, and what it holds."""
    rule, fraction, val = meta.get("val_rule"), meta["val_fraction"], meta["val"]
    if rule == "positions":
        return (f"validation split: the last {_percent(fraction)} of the token stream ({val['tokens']:,} tokens), "
                f"by position, because whole documents gave none ({meta['train']['documents']:,} document(s))")  # fmt: skip
    if rule == "none":
        return "validation split: none (val_fraction 0)"
    return (f"validation split: {val['documents']:,} whole document(s) chosen by a hash of their text "
            f"({val['tokens']:,} tokens, val_fraction {fraction:g})")  # fmt: skip


def tiny_warning(n_tokens: int) -> str | None:
    """A warning for a validation split too small to trust its loss to two decimals; None if not."""
    if not 0 < n_tokens < TINY_VAL_TOKENS:
        return None
    return (f"the validation split has only {n_tokens:,} tokens to evaluate (under {TINY_VAL_TOKENS:,}): its "
            "val_loss and val_ppl are rough estimates from so few; more text gives steadier ones")
