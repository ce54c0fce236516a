"""Config files: the contract keys, locking, `:arg` parsing, the recipes, that every shipped
config passes the trainer's checks on 8 CPU devices; loading by name or from a copy anywhere;
other tools' key names; train / bench / generate --help."""

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from gpt2_jax.configs import PRESETS, aliases, common
from gpt2_jax.configs import load as config_load
from gpt2_jax.configs.keys import DEFAULTS, KEYS
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
    """configs/NAME.py[:ARG] of the checkout, loaded as --config loads it."""
    return config_load.load(f"{ROOT}/configs/{name}.py" + ("" if arg is None else f":{arg}"))


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
    assert f"python -m gpt2_jax.train --config {name} --workdir" in importlib.import_module(f"gpt2_jax.configs.{name}").__doc__


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
    assert c.grad_accum == 0 and c.batch_size % c.microbatch_per_device == 0  # grad_accum from the devices
    assert c.model.scan_layers and c.model.remat == "dots_saveable"  # a scanned step needs remat to fit a v5e


@pytest.mark.parametrize("name, devices, accum", [
    ("gpt2_124m", 8, 4), ("gpt2_124m", 4, 8), ("gpt2_124m", 512, 1),  # 16 sequences per device at most
    ("gpt2_1558m", 8, 64), ("gpt2_1558m", 32, 16), ("gpt2_1558m", 512, 1),  # 2 per device: 1024 / (2 x 512)
])  # fmt: skip
def test_presets_derive_grad_accum_from_the_devices(name, devices, accum):
    """microbatch_per_device fixes what one device runs at once; grad_accum follows, so a preset
    runs unchanged from 4 to 512 chips (gpt2_1558m's grad_accum 64 was refused beyond 16)."""
    c = load(name)
    assert plan_lib._grad_accum(c, devices) == (accum, ())
    per_device_micro = c.batch_size // accum // devices
    assert per_device_micro == min(c.microbatch_per_device, c.batch_size // devices)


def test_the_plan_derives_grad_accum_and_an_explicit_grad_accum_wins():
    c = load("gpt2_1558m")  # all FSDP: the 8 CPU devices are data-parallel
    assert plan_lib.plan(c, data=False).grad_accum == 1024 // (2 * 8)
    c.grad_accum = 8
    p = plan_lib.plan(c, data=False)
    assert p.grad_accum == 8 and "note: grad_accum 8 overrides microbatch_per_device 2" in p.notes
    c = load("tiny")
    c.grad_accum, c.microbatch_per_device = 0, 1  # 16 sequences on 8 devices, 1 at a time
    assert plan_lib.plan(c, data=False).grad_accum == 2
    c.microbatch_per_device = 3  # 2 per device is not a multiple of 3, but is no more than it: 1 step
    assert plan_lib.plan(c, data=False).grad_accum == 1
    c.batch_size = 48  # 6 per device: 2 microbatches of 3
    assert plan_lib.plan(c, data=False).grad_accum == 2
    c.batch_size = 32  # 4 per device: not a whole number of 3s
    with pytest.raises(plan_lib.ConfigError, match=r"32 / 8 = 4 sequences per device is not a multiple of "
                       r"microbatch_per_device \(3\)"):  # fmt: skip
        plan_lib.plan(c, data=False)


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


# --- configs a user can trust -------------------------------------------------------------------


def _write(path, body):
    path.write_text("from gpt2_jax.configs import common\n\n\ndef get_config(arg=None):\n"
                    "    c = common.base_config()\n" + body + "    return c\n")  # fmt: skip
    return str(path)


def test_base_config_is_locked_before_a_file_sets_keys(tmp_path):
    c = common.base_config()
    assert c.is_locked
    with pytest.raises(AttributeError):
        c.learning_rate = 1e-3
    with pytest.raises(AttributeError):
        c.model.n_layers = 3
    typo = _write(tmp_path / "typo.py", "    c.lr = 1e-3\n    c.learning_rate = 1e-3\n")
    with pytest.raises(train.UsageError) as e:
        train.parse_args(["train", "--config", typo, "--workdir", "w"])
    assert str(e.value) == (f"config {typo}, line 7: unknown config key 'learning_rate'; did you mean lr? "
                            "(learning_rate is nanoGPT's and HF Trainer's name)")  # fmt: skip
    nested = _write(tmp_path / "nested.py", "    c.model.n_layers = 3\n")
    with pytest.raises(train.UsageError, match="line 6: unknown config key 'n_layers'; did you mean model.n_layer"):
        train.parse_args(["train", "--config", nested, "--workdir", "w"])


def test_base_config_is_the_key_table_and_help_lists_every_key(capsys):
    """--help and base_config() read the same table, so they cannot drift."""
    base = common.base_config()
    assert {k: _get(base, k) for k in DEFAULTS} == DEFAULTS and set(config_load.flat_keys(base)) == set(DEFAULTS)
    assert train.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m gpt2_jax.train --config configs/X.py[:ARG] --workdir DIR" in out
    for key, default, meaning in KEYS:
        line = next(line for line in out.splitlines() if line.startswith(f"  {key} "))
        assert repr(default) in line and meaning.split()[0] in line, line
    assert "  max_iters (nanoGPT) -> total_steps" in out
    assert "  output_dir (HF Trainer) -> --workdir" in out
    assert train.main(["train", "--config", "tiny", "--help"]) == 0  # that config's values
    out = capsys.readouterr().out
    assert "values of tiny" in out and any(line.split()[:2] == ["model.n_layer", "2"] for line in out.splitlines())


def test_a_config_copied_anywhere_imports_the_shared_pieces(tmp_path):
    copy = tmp_path / "my_tiny.py"
    copy.write_text((ROOT / "gpt2_jax" / "configs" / "tiny.py").read_text())
    c, _ = train.parse_args(["train", "--config", str(copy), "--workdir", "w", "--config.lr=1e-3"])
    assert c.lr == 1e-3 and c.to_dict() == {**load("tiny").to_dict(), "lr": 1e-3}
    old_style = tmp_path / "old.py"
    old_style.write_text("import common\n\n\ndef get_config(arg=None):\n    return common.base_config()\n")
    with pytest.raises(train.UsageError, match=r"line 1: No module named 'common'; .*`from gpt2_jax.configs import common`"):
        train.parse_args(["train", "--config", str(old_style), "--workdir", "w"])


def test_packaged_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for name in PRESETS:
        assert config_load.load(name).to_dict() == load(name).to_dict(), name
    c, _ = train.parse_args(["train", "--config", "gpt2_124m:tokens=1e9", "--workdir", "w"])
    assert c.total_steps == 1907
    c, _ = train.parse_args(["train", "--config=configs/shakespeare.py:quick", "--workdir", "w"])  # README's line
    assert c.total_steps == 28
    with pytest.raises(train.UsageError, match="gpt2_125m is neither a file nor a packaged config.*did you mean gpt2_124m"):
        train.parse_args(["train", "--config", "gpt2_125m", "--workdir", "w"])


def test_the_checkout_configs_are_the_packaged_ones():
    packaged = {p.stem for p in (ROOT / "gpt2_jax" / "configs").glob("*.py") if "\ndef get_config(" in p.read_text()}
    assert packaged == set(PRESETS)
    assert {p.stem for p in (ROOT / "configs").glob("*.py")} == set(PRESETS) | {"common"}
    for name in PRESETS:
        spec = importlib.util.spec_from_file_location(f"checkout_{name}", ROOT / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.get_config is importlib.import_module(f"gpt2_jax.configs.{name}").get_config


def test_configs_import_no_jax():
    code = ("import sys; from gpt2_jax.configs import load; load.load('gpt2_1558m'); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'gpt2_jax.train')], 'jax'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_a_config_must_hold_exactly_the_trainers_keys(tmp_path):
    bare = tmp_path / "bare.py"
    bare.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    "    return ml_collections.ConfigDict({'lr': 1e-3, 'learning_rate': 1e-3})\n")  # fmt: skip
    with pytest.raises(config_load.ConfigFileError, match="unknown config key 'learning_rate'; did you mean lr"):
        config_load.load(str(bare))
    bare.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    "    return ml_collections.ConfigDict({'lr': 1e-3})\n")  # fmt: skip
    with pytest.raises(config_load.ConfigFileError, match="lacks .*start from .*common.base_config"):
        config_load.load(str(bare))


# --- the names people type ----------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--config.learning_rate=1e-3"], "unknown config key 'learning_rate' (--config.learning_rate); did you mean lr? "
     "(learning_rate is nanoGPT's and HF Trainer's name)"),
    (["--config.max_iters=100"], "unknown config key 'max_iters' (--config.max_iters); did you mean total_steps? "
     "(max_iters is nanoGPT's name)"),
    (["--config.gradient_accumulation_steps=4"], "did you mean grad_accum? (gradient_accumulation_steps is nanoGPT's "
     "and HF Trainer's name)"),
    (["--config.eval_interval=10"], "did you mean eval_every? (eval_interval is nanoGPT's name)"),
    (["--config.per_device_train_batch_size=8"], "did you mean batch_size? (per_device_train_batch_size is HF "
     "Trainer's name: batch_size is global here, in sequences per optimizer step: per_device_train_batch_size x "
     "devices x gradient_accumulation_steps)"),
    (["--config.num_train_epochs=3"], "did you mean num_epochs? (num_train_epochs is HF Trainer's name)"),
    (["--config.output_dir=runs/x"], "did you mean --workdir DIR (a flag, not a config key)? (output_dir is HF "
     "Trainer's name)"),
    (["--config.n_layer=4"], "did you mean model.n_layer?"),
    (["--lr=1e-3"], "unknown flag --lr; config keys are set as --config.lr=VALUE"),
    (["--max_iters=100"], "unknown flag --max_iters; did you mean --config.total_steps=VALUE? (max_iters is "
     "nanoGPT's name)"),
    (["--output_dir", "runs/x"], "unknown flag --output_dir; did you mean --workdir? (output_dir is HF Trainer's "
     "name)"),
    (["--out_dir=runs/x"], "unknown flag --out_dir; did you mean --workdir? (out_dir is nanoGPT's name)"),
])  # fmt: skip
def test_other_tools_names_suggest_ours(extra, message):
    with pytest.raises(train.UsageError) as e:
        train.parse_args(["train", "--config", "tiny", "--workdir", "w", *extra])
    assert message in str(e.value)


def test_every_alias_names_a_real_key_or_flag():
    for name, (tools, target, note) in aliases.ALIASES.items():
        assert name not in DEFAULTS and tools, name
        assert target in DEFAULTS or target == "--workdir" or (target == "" and note), name


def test_samples_start_from_endoftext_unless_the_config_is_for_the_bundled_plays():
    assert common.base_config().sample.prompt == ""
    for name in PRESETS:
        c = load(name, "data=d" if name == "finetune_summarize" else None)
        if name != "shakespeare":  # tiny runs on any --config.data.path too
            assert "Romeo" not in c.sample.prompt, name
    assert load("tiny").sample.prompt == "" and load("shakespeare").sample.prompt == "Romeo.\n"


def test_bench_and_generate_help_show_config_and_defaults(capsys):
    from gpt2_jax.infer import generate
    from gpt2_jax.tools import bench

    for parse in (bench.parse_args, generate.parse_args):
        with pytest.raises(SystemExit) as e:
            parse(["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m gpt2_jax.bench --config NAME|FILE[:ARG] [--config.KEY=VALUE ...]" in out
    assert "required: the config to time" in out and "timed steps (default 10)" in out
    options = {" ".join(o.split()[:2]): " ".join(o.split()) for o in re.split(r"\n  (?=--)", out)}
    for flag, default in [("--max_new_tokens N", "100"), ("--temperature T", "0.8"), ("--top_k K", "200"),
                          ("--top_p P", "1.0"), ("--num_samples S", "1"), ("--seed S", "0")]:  # fmt: skip
        assert f"(default {default})" in options[flag], options[flag]
    c, args = bench.parse_args(["--config", "tiny", "--config.batch_size=8", "--steps", "3"])
    assert (c.batch_size, c.model.n_layer, args.steps) == (8, 2, 3)
