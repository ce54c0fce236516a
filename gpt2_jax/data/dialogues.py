"""A synthetic dialogue -> summary set: templated chats whose summary is a deterministic function of the chat.

For offline fine-tuning tests and the README walkthrough (scripts/make_dialogues.py writes it as
SAMSum-style jsonl: {"dialogue": ..., "summary": ...} rows; prepare it with --template TEMPLATE).
"""

from __future__ import annotations

import json
import random

TEMPLATE = "{dialogue}\nTL;DR:"  # the prompt built from a row (prepare --template)

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
    """n dialogues drawn from one seed (the same n and seed give the same rows)."""
    rng = random.Random(seed)
    return [synthetic_dialogue(rng) for _ in range(n)]


def write_jsonl(path: str, rows: list[dict]) -> None:
    """One JSON object per line."""
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
