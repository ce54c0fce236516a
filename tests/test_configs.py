"""Config files: the contract keys, locking, `:arg` parsing, the recipes, and that every shipped
config passes the trainer's checks on 8 CPU devices."""

import importlib.util
import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from gpt2_jax.data.shards import HEADER_WORDS, MAGIC, VERSION
from gpt2_jax.train import cli as train
from gpt2_jax.train import plan as plan_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["tiny", "shakespeare", "gpt2_124m", "gpt2_350m", "gpt2_774m", "gpt2_1558m"]
CONTRACT_KEYS = [
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.dropout", "data.path",
    "batch_size", "grad_accum", "total_steps", "lr", "warmup_steps", "eval_every", "checkpoint_every",
    "log_every", "seed", "dtype", "init_from", "mesh.data", "mesh.fsdp", "mesh.tensor",
]


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _get(c, key):
    for part in key.split("."):
        c = c[part]
    return c


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Enough tokens for one 1024-token window in each split."""
    path = tmp_path_factory.mktemp("shards")
    for split, n in (("train", 5000), ("val", 2000)):
        header = np.zeros(HEADER_WORDS, "<i4")
        header[:3] = MAGIC, VERSION, n
        tokens = np.random.default_rng(0).integers(0, 50257, n).astype("<u2")
        (path / f"{split}_000000.bin").write_bytes(header.tobytes() + tokens.tobytes())
    return str(path)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_has_the_contract_keys_and_is_locked(name):
    c = load(name)
    assert isinstance(c, ml_collections.ConfigDict) and c.is_locked
    for key in CONTRACT_KEYS:
        _get(c, key)  # raises if missing
    with pytest.raises(AttributeError):
        c.n_layers = 3
    with pytest.raises(AttributeError):
        c.model.heads = 3
    assert c.dtype in ("float32", "bfloat16") and c.init_from == "scratch"
    doc = open(ROOT / "configs" / f"{name}.py").read()
    assert f"python -m gpt2_jax.train --config configs/{name}.py --workdir" in doc


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_passes_the_trainers_checks_on_8_devices(name, shards):
    c = load(name)
    c.data.path = shards
    p = plan_lib.plan(c)
    assert p.mesh.size == 8 and p.total_steps == c.total_steps
    assert p.model.n_layer == c.model.n_layer and p.model.n_embd == c.model.n_embd


def test_gpt2_124m_is_the_llm_c_recipe():
    c = load("gpt2_124m")
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size) == (12, 12, 768, 1024)
    assert c.batch_size * c.model.block_size == 524_288  # 0.5M tokens per step
    assert c.total_steps == 19_073  # 10B tokens
    assert (c.lr, c.warmup_steps, c.min_lr_ratio) == (6e-4, 700, 0.1)
    assert (c.weight_decay, c.beta1, c.beta2, c.grad_clip) == (0.1, 0.9, 0.95, 1.0)
    assert c.dtype == "bfloat16" and c.model.dropout == 0.0 and c.model.vocab_pad_multiple == 128
    assert c.batch_size % c.grad_accum == 0


@pytest.mark.parametrize("name, shape", [
    ("gpt2_350m", (24, 16, 1024)), ("gpt2_774m", (36, 20, 1280)), ("gpt2_1558m", (48, 25, 1600)),
])
def test_larger_configs_have_gpt2_shapes(name, shape):
    c = load(name)
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd) == shape
    if name in ("gpt2_774m", "gpt2_1558m"):
        assert (c.mesh.data, c.mesh.fsdp) == (1, -1)  # FSDP by default


def test_tokens_argument_sets_the_step_count():
    assert load("gpt2_124m", "tokens=1e9").total_steps == round(1e9 / 524_288)
    with pytest.raises(ValueError, match="unknown config argument 'steps'"):
        load("gpt2_124m", "steps=5")


def test_shakespeare_quick_argument_and_bundled_corpus():
    full, quick = load("shakespeare"), load("shakespeare", "quick")
    assert full.data.path == "" and full.data.bundled == "shakespeare"
    assert quick.total_steps == full.total_steps // 10


def test_bundled_corpus_is_prepared_when_data_path_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path))
    p = plan_lib.plan(load("tiny"))
    assert p.data_path == os.path.join(str(tmp_path), "shakespeare")
    assert p.windows_per_epoch > 10_000


def test_command_line_overrides_and_arguments(tmp_path):
    argv = ["train", "--config", "configs/gpt2_124m.py:tokens=1e9", "--workdir", str(tmp_path),
            "--config.lr=1e-3", "--config.mesh.fsdp=2", "--config.model.dropout=0.1"]
    c, workdir = train.parse_args([a if not a.startswith("configs/") else str(ROOT / a) for a in argv])
    assert workdir == str(tmp_path)
    assert (c.lr, c.mesh.fsdp, c.model.dropout, c.total_steps) == (1e-3, 2, 0.1, 1907)
    with pytest.raises(train.UsageError, match="unknown config key 'mesh.fdsp'.*did you mean mesh.fsdp"):
        train.parse_args(["train", f"--config={ROOT}/configs/tiny.py", "--workdir", "w", "--config.mesh.fdsp=2"])
    with pytest.raises(train.UsageError, match="unknown config argument"):
        train.parse_args(["train", f"--config={ROOT}/configs/tiny.py:big", "--workdir", "w"])
