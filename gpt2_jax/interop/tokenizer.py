"""The GPT-2 BPE tokenizer, built offline from the bundled ranks file, and its HF tokenizer files."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from importlib import resources

import tiktoken

EOT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257

_RANKS_FILE = "gpt2.tiktoken"
_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation regex (tiktoken's r50k/gpt2 pattern).
_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _read_ranks_bytes() -> bytes:
    data = resources.files("gpt2_jax").joinpath("assets", _RANKS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _RANKS_SHA256:
        raise RuntimeError(
            f"gpt2_jax/assets/{_RANKS_FILE} is corrupted (sha256 {digest}, expected "
            f"{_RANKS_SHA256}); reinstall gpt2_jax"
        )
    return data


@functools.lru_cache(maxsize=1)
def mergeable_ranks() -> dict[bytes, int]:
    """Token bytes -> rank (= token id) for the 50,256 ordinary GPT-2 tokens."""
    ranks = {}
    for line in _read_ranks_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The exact GPT-2 tokenizer as a `tiktoken.Encoding`; reads only the bundled file."""
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=_PAT_STR,
        mergeable_ranks=mergeable_ranks(),
        special_tokens={EOT: EOT_ID},
    )


# --- Hugging Face tokenizer files ----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (as in openai/gpt-2 encoder.py)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _to_unicode(token: bytes) -> str:
    table = _bytes_to_unicode()
    return "".join(table[b] for b in token)


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run BPE on `token` using only merges ranked below `max_rank`; the final two parts
    are the merge that creates `token`."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_i, best_rank = i, rank
        if best_i is None:
            return parts
        parts = parts[:best_i] + [parts[best_i] + parts[best_i + 1]] + parts[best_i + 2 :]


def hf_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """vocab.json's mapping and merges.txt's lines, derived from the ranks."""
    ranks = mergeable_ranks()
    vocab = {_to_unicode(tok): rank for tok, rank in ranks.items()}
    vocab[EOT] = EOT_ID
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = _merge_parts(ranks, tok, rank)
        if len(parts) != 2:
            raise RuntimeError(f"cannot derive a merge for token {rank}")
        merges.append(f"{_to_unicode(parts[0])} {_to_unicode(parts[1])}")
    return vocab, merges


def save_hf_tokenizer(path: str, model_max_length: int = 1024) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json so that
    `transformers.AutoTokenizer.from_pretrained(path)` encodes exactly as `get_tokenizer()`."""
    vocab, merges = hf_vocab_and_merges()
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        **special,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
