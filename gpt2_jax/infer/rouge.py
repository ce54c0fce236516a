"""Summarisation scoring: greedy completions of prompts, ROUGE-1/2/L against references.

    rows = read_pairs("data/dialogues/val_pairs.jsonl")           # [{"prompt", "completion"}, ...]
    scores, predictions = rouge_eval(config, params, rows, max_new_tokens=64)

Also a synthetic dialogue -> summary set (templated chats whose summary is a deterministic
function of the chat), for offline tests and the README walkthrough.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict

import jax
import numpy as np

from gpt2_jax.errors import UserError
from gpt2_jax.infer.sampling import Sampler, SamplingConfig
from gpt2_jax.interop.tokenizer import EOT_ID, get_tokenizer
from gpt2_jax.model import GPT2Config

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
TEMPLATE = "{dialogue}\nTL;DR:"  # prompts of the synthetic set (prepare --template)


def read_pairs(path: str, prompt_field: str = "prompt", completion_field: str = "completion",
               template: str | None = None) -> list[dict]:  # fmt: skip
    """{"prompt", "completion"} rows of a jsonl file (prepare writes DIR/val_pairs.jsonl); with
    `template`, the prompt is the template filled from each row's fields."""
    from gpt2_jax.data import pairs

    try:
        return [pairs.make_pair(where, row, prompt_field, completion_field, template)._asdict()
                for where, row in pairs.jsonl_rows([path])]  # fmt: skip
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None


def complete(config: GPT2Config, params, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions, cut at <|endoftext|>. Prompts of equal token length decode together;
    a prompt longer than the context keeps its end."""
    enc = get_tokenizer()
    keep = config.n_positions - max_new_tokens
    tokens = [enc.encode(p, allowed_special="all")[-keep:] or [EOT_ID] for p in prompts]
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


# --- a synthetic set ------------------------------------------------------------------------------

NAMES = ("Anna", "Ben", "Carla", "Dev", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jon", "Kate", "Liam")
PLACES = ("the cafe", "the library", "the park", "the station", "the gym", "the office", "the cinema")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
OPENERS = ("Hi {b}!", "Hey {b}, how are you?", "Hello {b}.", "{b}, quick question.")
ASKS = ("Can we meet at {place} on {day} at {hour}?", "Are you free on {day}? {place} at {hour}?",
        "Shall we meet at {place}, {day} at {hour}?")  # fmt: skip
YES = ("Sure, see you at {place}.", "Yes, {day} works for me.", "Great, {hour} it is.")
NO = ("Sorry, I can't on {day}.", "No, {day} is busy for me.", "I can't make it, sorry.")


def synthetic_dialogue(rng: random.Random) -> dict:
    """A two-person chat arranging a meeting; the summary is a function of its facts."""
    a, b = rng.sample(NAMES, 2)
    facts = dict(a=a, b=b, place=rng.choice(PLACES), day=rng.choice(DAYS), hour=f"{rng.randint(1, 9)} pm")
    agrees = rng.random() < 0.5
    lines = [f"{a}: {rng.choice(OPENERS)} {rng.choice(ASKS)}", f"{b}: {rng.choice(YES if agrees else NO)}"]
    if agrees:
        summary = "{a} and {b} will meet at {place} on {day} at {hour}."
    else:
        summary = "{b} can't meet {a} at {place} on {day}."
    return {"dialogue": "\n".join(lines).format(**facts), "summary": summary.format(**facts)}


def synthetic_dialogues(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [synthetic_dialogue(rng) for _ in range(n)]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
