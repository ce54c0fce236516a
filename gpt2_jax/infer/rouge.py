"""Summarisation scoring: greedy completions of prompts, ROUGE-1/2/L against references.

    rows = [{"prompt": ..., "completion": ...}, ...]  # e.g. gpt2_jax.data.pairs.read_pairs(DIR/val_pairs.jsonl)
    scores, predictions = rouge_eval(config, params, rows, max_new_tokens=64)
"""

from __future__ import annotations

from collections import defaultdict

import jax
import numpy as np

from gpt2_jax.infer.sampling import Sampler, SamplingConfig
from gpt2_jax.interop.tokenizer import EOT_ID, get_tokenizer
from gpt2_jax.model import GPT2Config

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def complete(config: GPT2Config, params, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions, cut at <|endoftext|>. Prompts of equal token length decode together;
    a prompt longer than the context keeps its end."""
    enc = get_tokenizer()
    keep = config.n_positions - max_new_tokens
    tokens = [enc.encode_ordinary(p)[-keep:] or [EOT_ID] for p in prompts]  # as prepare encodes prompts
    by_length = defaultdict(list)
    for i, t in enumerate(tokens):
        by_length[len(t)].append(i)
    sampler = Sampler(config, params, SamplingConfig(temperature=0.0))
    out: list[str] = [""] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            rows = sampler.generate(np.array([tokens[i] for i in chunk], np.int32), max_new_tokens, jax.random.key(0))
            for i, row in zip(chunk, rows):
                out[i] = enc.decode([t for t in row if t != EOT_ID])
    return out


def rouge(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F-measures (rouge-score, with stemming) and the mean prediction length in words."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    out = {k: float(np.mean([s[k].fmeasure for s in scores])) for k in ROUGE_KEYS}
    out["mean_len"] = float(np.mean([len(p.split()) for p in predictions]))
    return out


def rouge_eval(config: GPT2Config, params, rows: list[dict], max_new_tokens: int) -> tuple[dict, list[str]]:
    """(ROUGE of greedy completions of each row's prompt against its completion, the completions)."""
    predictions = complete(config, params, [r["prompt"] for r in rows], max_new_tokens)
    return rouge(predictions, [r["completion"].strip() for r in rows]), predictions
