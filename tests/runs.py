"""Shared pieces of the training tests: synthetic shards (conftest's `shards` fixture), the tiny
config with overrides, reading a run's metrics, running a CLI in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from gpt2_jax.configs import load as config_load
from gpt2_jax.data.shards import HEADER_WORDS, MAGIC, VERSION

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512


def write_shard(file, tokens):
    header = np.zeros(HEADER_WORDS, "<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    with open(file, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, "<u2").tobytes())


def markov_tokens(n, seed):
    """A learnable stream over 64 of the 512 tokens: each has 2 possible successors (ln 2 nats)."""
    rng = np.random.default_rng(seed)
    table = np.random.default_rng(123).integers(0, 64, size=(64, 2)) * 7 + 5
    index = np.full(VOCAB, -1)
    index[table.ravel()] = np.arange(table.size) // 2
    out = np.empty(n, np.int64)
    out[0] = table[0, 0]
    choices = rng.integers(0, 2, size=n)
    for i in range(1, n):
        out[i] = table[index[out[i - 1]], choices[i]]
    return out


def load_config(name, arg=None):
    """A packaged config, loaded as `--config NAME[:ARG]` loads it."""
    return config_load.load(name if arg is None else f"{name}:{arg}")


def tiny(shards, **overrides):
    """configs/tiny.py on the synthetic shards with a 512-token vocabulary."""
    c = load_config("tiny")
    settings = {
        "model.vocab_size": VOCAB, "model.block_size": 32, "data.path": shards, "data.bundled": "",
        "batch_size": 16, "total_steps": 12, "warmup_steps": 2, "eval_every": 0, "eval_batches": 2,
        "log_every": 1, "progress_bar": False, "sample.length": 0,
    }
    settings.update(overrides)
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def losses(workdir):
    train_rows, _ = rows(workdir)
    return np.array([r["loss"] for r in train_rows])


def cli(*args, devices=1, env=None, module="gpt2_jax.train", timeout=300):
    """`python -m module *args` on `devices` CPU devices; `env` adds environment variables."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           **(env or {})}  # fmt: skip
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
