"""Test setup: 8 virtual CPU devices (so sharding is exercised), offline, float32 matmuls."""

import os

# Before JAX initialises its backends: 8 CPU devices, and never a hub download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402
from runs import markov_tokens, write_shard  # noqa: E402


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Synthetic train/val shards over a 512-token vocabulary with a learnable Markov structure."""
    path = tmp_path_factory.mktemp("shards")
    write_shard(path / "train_000000.bin", markov_tokens(40_000, 0))
    write_shard(path / "val_000000.bin", markov_tokens(4_000, 1))
    return str(path)
