"""The trainer: end-to-end runs on 8 CPU devices, mesh invariance, parity with torch's AdamW on
transformers' GPT-2, exact dropout randomness, and refusal of every invalid config."""

import os

import jax
import numpy as np
import pytest
from runs import VOCAB, cli, losses, markov_tokens, rows, tiny, write_shard

from gpt2_jax.data.loader import make_train_iterator
from gpt2_jax.interop import hf
from gpt2_jax.model import GPT2, GPT2Config, init_params
from gpt2_jax.parallel import sharding
from gpt2_jax.train import cli as train
from gpt2_jax.train import optim, steps
from gpt2_jax.train import plan as plan_lib

# --- end to end ----------------------------------------------------------------------------


def test_end_to_end_loss_falls_and_eval_rows_appear(shards, tmp_path):
    config = tiny(shards, total_steps=24, eval_every=12, log_every=4, **{"sample.length": 8, "sample.prompt": "a"})
    summary = train.train_and_evaluate(config, str(tmp_path))
    train_rows, eval_rows = rows(tmp_path)

    assert [r["step"] for r in train_rows] == [1, 4, 8, 12, 16, 20, 24]
    for r in train_rows:
        assert {"step", "loss", "lr", "epoch", "grad_norm"} <= set(r)
    for r in train_rows[1:]:  # the first row is the compile step: no throughput
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
    assert train_rows[0]["loss"] > 5.0  # near-uniform over 512 tokens at init
    assert train_rows[-1]["loss"] < 1.5  # close to the data's ln 2 entropy
    assert train_rows[-1]["epoch"] == pytest.approx(24 * 16 / ((40_000 - 1) // 32))

    assert [r["step"] for r in eval_rows] == [12, 24]
    assert eval_rows[1]["val_loss"] < eval_rows[0]["val_loss"] < np.log(VOCAB)
    assert eval_rows[1]["val_ppl"] == pytest.approx(np.exp(eval_rows[1]["val_loss"]), rel=1e-6)
    assert eval_rows[1]["val_tokens"] == 2 * 16 * 32
    assert isinstance(eval_rows[1]["sample"], str) and eval_rows[1]["sample"].startswith("a")
    assert summary["step"] == 24 and summary["val_loss"] == eval_rows[1]["val_loss"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_meshes_and_grad_accumulation_give_the_same_losses(shards, tmp_path):
    runs = {
        "8x1x1": dict(),
        "2x4x1": {"mesh.data": 2, "mesh.fsdp": 4},
        "1x8x1": {"mesh.data": 1, "mesh.fsdp": 8},
        "2x2x2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
        "2x2x2 accum 2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "grad_accum": 2},
    }
    by_mesh = {}
    for name, overrides in runs.items():
        workdir = str(tmp_path / name.replace(" ", "_"))
        train.train_and_evaluate(tiny(shards, total_steps=5, **overrides), workdir)
        by_mesh[name] = losses(workdir)
    reference = by_mesh["8x1x1"]
    assert len(reference) == 5 and reference[-1] < reference[0] - 0.1
    for name, values in by_mesh.items():
        np.testing.assert_allclose(values, reference, rtol=2e-5, err_msg=name)


# --- against torch -------------------------------------------------------------------------


def _torch_losses(hf_dir, batches, grad_accum, schedule, c):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.train()  # dropout is 0: train mode changes nothing but is what a trainer runs
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / c.lr)
    losses = []
    for batch in batches:
        opt.zero_grad()
        total = 0.0
        for a in range(grad_accum):  # microbatch a = rows a, a + A, a + 2A, ... as in split_microbatches
            x = torch.as_tensor(batch["inputs"][a::grad_accum], dtype=torch.long)
            y = torch.as_tensor(batch["targets"][a::grad_accum], dtype=torch.long)
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        sched.step()
        losses.append(total)
    return np.array(losses)


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_losses_match_torch_adamw_on_transformers_gpt2(shards, tmp_path, grad_accum):
    """Same initial weights (our init exported with hf.save_hf, loaded by both), the same
    batches (the trainer's data iterator replayed), AdamW + clipping + warmup/cosine on both
    sides: per-step losses agree within 1e-4 relative for 10 steps in float32."""
    hf_dir = str(tmp_path / "init")
    config = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    hf.save_hf(hf_dir, config, jax.device_get(init_params(config, jax.random.key(7))))
    c = tiny(shards, total_steps=10, warmup_steps=3, lr=1e-2, weight_decay=0.1, grad_clip=1.0,
             grad_accum=grad_accum, init_from=f"hf:{hf_dir}", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    train.train_and_evaluate(c, str(tmp_path / "run"))
    ours = losses(tmp_path / "run")

    it = make_train_iterator(c.data.path, block_size=c.model.block_size, global_batch_size=c.batch_size,
                             seed=c.seed, vocab_size=VOCAB)
    batches = [next(it) for _ in range(10)]
    schedule = optim.lr_schedule(c.lr, c.total_steps, c.warmup_steps, c.min_lr_ratio)
    theirs = _torch_losses(hf_dir, batches, grad_accum, schedule, c)

    assert len(ours) == 10
    assert theirs[-1] < theirs[0] - 0.5  # the optimizer did real work
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


# --- the step functions --------------------------------------------------------------------


def _setup(dropout=0.1, mesh_shape=(8, 1, 1)):
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2, dropout=dropout)
    lr = optim.lr_schedule(1e-2, 10, 2)
    model, tx = GPT2(config), optim.make_optimizer(lr)
    mesh = sharding.make_mesh(mesh_shape)
    _, specs = steps.abstract_state(model, tx, lr, seed=3)
    shardings = sharding.logical_to_shardings(specs, mesh, sharding.DEFAULT_RULES)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(8, 17))
    batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
    step = jax.jit(steps.train_step, donate_argnums=0)
    return model, tx, lr, mesh, shardings, batch, step


def test_resumed_state_continues_bit_for_bit_with_dropout():
    model, tx, lr, mesh, shardings, batch, step = _setup()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        state = steps.init_state(model, tx, lr, 3, shardings)
        for _ in range(3):
            state, m = step(state, batch)
        straight = jax.device_get(state.params)

        state = steps.init_state(model, tx, lr, 3, shardings)
        state, _ = step(state, batch)
        state, _ = step(state, batch)
        saved = jax.device_get(state)  # host copies: what a checkpoint holds
        resumed, _ = step(jax.device_put(saved, shardings), batch)
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(jax.device_get(resumed.params))):
        np.testing.assert_array_equal(a, b)


def test_dropout_differs_between_steps_and_is_off_in_eval():
    model, _, _, mesh, _, batch, _ = _setup()
    zero = lambda s: 0.0  # noqa: E731  (lr 0: the parameters never change)
    frozen = optim.make_optimizer(zero)
    _, specs = steps.abstract_state(model, frozen, zero)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        state = steps.init_state(model, frozen, zero, 3, sharding.logical_to_shardings(specs, mesh, sharding.DEFAULT_RULES))
        losses = []
        for _ in range(2):
            state, m = jax.jit(steps.train_step)(state, batch)
            losses.append(float(m["loss"]))
        eval_loss = float(jax.jit(steps.eval_step)(state, batch)["loss"])
        eval_again = float(jax.jit(steps.eval_step)(state, batch)["loss"])
    assert losses[0] != losses[1]  # a new dropout mask each step
    assert eval_loss == eval_again and eval_loss not in losses


def test_microbatched_step_equals_the_whole_batch_step():
    model, tx, lr, mesh, shardings, batch, step = _setup(dropout=0.0)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        whole, m1 = step(steps.init_state(model, tx, lr, 3, shardings), batch)
        split, m2 = step(steps.init_state(model, tx, lr, 3, shardings), steps.split_microbatches(batch, 4))
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(split.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_split_microbatches_interleavesrows():
    batch = {"inputs": np.arange(12).reshape(6, 2)}
    out = steps.split_microbatches(batch, 3)["inputs"]
    assert out.shape == (3, 2, 2)
    np.testing.assert_array_equal(out[1], [[2, 3], [8, 9]])  # rows 1 and 4


# --- invalid configs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def not_hf(tmp_path_factory):
    return str(tmp_path_factory.mktemp("not_hf"))


INVALID = [
    ({"model.n_embd": 65}, "model.n_embd (65) must be divisible by model.n_head (4)"),
    ({"model.block_size": 256}, "model.block_size (256) exceeds the model's 128 positions"),
    ({"batch_size": 12}, "divisible by the 8 data-parallel devices"),
    ({"batch_size": 16, "grad_accum": 3}, "batch_size (16) must be divisible by grad_accum (3)"),
    ({"batch_size": 16, "grad_accum": 4}, "4 sequences per microbatch must be divisible by the 8 data-parallel"),
    ({"eval_batch_size": 4, "eval_every": 5}, "eval_batch_size (4) must be divisible by the 8"),
    ({"mesh.data": 3}, "mesh data x fsdp x tensor = 3 x 1 x 1 = 3 but there are 8 devices"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "only one mesh axis may be -1"),
    ({"mesh.tensor": 2, "mesh.data": -1, "model.vocab_size": 50257, "model.vocab_pad_multiple": 1}, "cannot shard wte (50257, 64)"),
    ({"mesh.tensor": 8}, "cannot shard h_0/attn/c_attn/bias (3, 4, 16): dimension 4 is split 8 ways"),  # heads
    ({"mesh.rules": (("embed", "model"),)}, "names no mesh axis"),
    ({"data.path": ""}, "data.path is empty"),
    ({"data.path": "/nonexistent/shards"}, "is not a folder"),
    ({"data.path": "", "data.bundled": "poe"}, "data.bundled must be one of"),
    ({"init_from": "gpt2"}, "init_from must be 'scratch', 'hf:PATH' or 'workdir:DIR', got 'gpt2'"),
    ({"init_from": "hf:/nonexistent/gpt2"}, "is not a folder"),
    ({"init_from": "hf:NOT_HF"}, "not a Hugging Face model folder"),
    ({"init_from": "workdir:/nonexistent"}, "is not a training workdir (no checkpoints/ in it)"),
    ({"dtype": "float16"}, "dtype must be 'float32' or 'bfloat16'"),
    ({"model.remat": "some"}, "remat must be one of"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"total_steps": 0}, "total_steps must be >= 1"),
    ({"sample.length": 200}, "exceed the model's 128 positions"),
    ({"model.dropout": 1.0}, "model.dropout must be in [0, 1)"),
    ({"model.attention": "flash"}, "attention must be one of 'auto', 'xla', 'cudnn', 'pallas', not 'flash'"),
    ({"model.attention": "cudnn"}, "model.attention='cudnn' needs an NVIDIA GPU (this process runs on cpu); use 'auto'"),
    ({"model.attention": "pallas"}, "model.attention='pallas' is a TPU kernel (this process runs on cpu"),
]


@pytest.mark.parametrize("overrides, message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_configs_are_refused_with_one_line(shards, not_hf, overrides, message):
    overrides = {k: (v.replace("NOT_HF", not_hf) if isinstance(v, str) else v) for k, v in overrides.items()}
    config = tiny(shards, **overrides)
    with pytest.raises(plan_lib.ConfigError) as e:
        plan_lib.plan(config)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_validation_split_is_refused_when_evaluating(tmp_path):
    write_shard(tmp_path / "train_000000.bin", markov_tokens(2_000, 0))
    with pytest.raises(plan_lib.ConfigError, match="no val shards .* set --config.eval_every=0"):
        plan_lib.plan(tiny(str(tmp_path), eval_every=5))
    assert plan_lib.plan(tiny(str(tmp_path), eval_every=0)).total_steps == 12


def test_num_epochs_sets_the_step_count(shards):
    windows = (40_000 - 1) // 32
    p = plan_lib.plan(tiny(shards, num_epochs=2.0))
    assert p.windows_per_epoch == windows and p.total_steps == -(-2 * windows // 16)


def test_refusal_comes_before_anything_compiles(shards, tmp_path, monkeypatch):
    def no_jit(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(jax, "jit", no_jit)
    with pytest.raises(plan_lib.ConfigError, match="cannot shard"):
        train.train_and_evaluate(tiny(shards, **{"mesh.tensor": 8, "model.vocab_size": 50257, "model.vocab_pad_multiple": 1}), str(tmp_path))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


# --- the command line ----------------------------------------------------------------------


def test_cli_trains_and_refuses_bad_configs_with_one_line(shards, tmp_path):
    common = ["--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"), f"--config.data.path={shards}",
              "--config.model.vocab_size=512", "--config.model.block_size=32", "--config.progress_bar=False"]
    ok = cli(*common, "--config.total_steps=3", "--config.warmup_steps=1", "--config.eval_every=3",
              "--config.sample.length=4")
    assert ok.returncode == 0, ok.stderr
    train_rows, eval_rows = rows(tmp_path / "run")
    assert [r["step"] for r in train_rows] == [1, 3] and [r["step"] for r in eval_rows] == [3]
    assert "val_loss" in ok.stdout

    for extra, message in [
        (["--config.model.n_head=5"], "error: model.n_embd (64) must be divisible by model.n_head (5)"),
        (["--config.model.n_layers=3"], "error: unknown config key 'model.n_layers' (--config.model.n_layers); did you mean model.n_layer?"),
        (["--config.batch_size=abc"], "error: flag --config.batch_size=abc: invalid literal for int()"),
    ]:
        bad = cli(*common, *extra)
        assert bad.returncode == 2
        assert bad.stderr.strip().startswith(message), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    missing = cli("--config", "configs/tiny.py")
    assert missing.returncode == 2 and missing.stderr.strip() == "error: --workdir DIR is required"


def test_running_out_of_device_memory_is_one_line_that_says_what_to_change(shards, tmp_path, monkeypatch, capsys):
    def oom(config, workdir):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 512 bytes.\n...")

    monkeypatch.setattr(train, "train_and_evaluate", oom)
    argv = ["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"), f"--config.data.path={shards}"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of device memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                          "512 bytes.); lower batch_size or raise grad_accum")  # fmt: skip
    assert err.count("\n") == 1


# --- no silent surprises: notes, the last line, the training loss, hub ids --------------------


def test_a_short_run_warms_up_over_all_its_steps_says_so_once_and_ends_naming_its_checkpoint(shards, tmp_path, capsys):
    """Before, warmup_steps > total_steps refused the run (every short run of a long recipe)."""
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny(shards, total_steps=3, warmup_steps=100, **{"sample.prompt": "Romeo.\n"}), workdir)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines.count("note: warmup_steps 100 > total_steps 3; warming up over 3 steps") == 1
    assert lines[-1] == (f"done: checkpoint {workdir}/checkpoints/3; python -m gpt2_jax.generate --workdir {workdir} "
                         f'--prompt "Romeo."; python -m gpt2_jax.export --workdir {workdir} --out {workdir}_hf')
    assert os.path.isdir(f"{workdir}/checkpoints/3")
    lr = tiny(shards).lr
    np.testing.assert_allclose([r["lr"] for r in rows(workdir)[0]], [lr / 3, 2 * lr / 3, lr], rtol=1e-6)


def test_eval_rows_carry_the_training_loss_and_leave_the_training_data_alone(shards, tmp_path, capsys):
    with_eval, without = str(tmp_path / "eval"), str(tmp_path / "plain")
    train.train_and_evaluate(tiny(shards, total_steps=8, eval_every=4), with_eval)
    console = capsys.readouterr().out
    train.train_and_evaluate(tiny(shards, total_steps=8), without)
    np.testing.assert_array_equal(losses(with_eval), losses(without))  # the same batches, in the same order

    train_rows, eval_rows = rows(with_eval)
    assert [r["step"] for r in eval_rows] == [4, 8]
    for r in eval_rows:
        assert r["train_tokens"] == 2 * 16 * 32  # eval_batches 2 x eval batch 16 x block 32
        assert abs(r["train_loss"] - r["val_loss"]) < 0.1  # one distribution, one model
        assert f"val_loss {r['val_loss']:.4f}, val_ppl {r['val_ppl']:.2f}, train_loss {r['train_loss']:.4f}" in console
    # step 5's logged loss is the model after step 4 (the one evaluated) on the next training batch
    assert eval_rows[0]["train_loss"] == pytest.approx(train_rows[4]["loss"], abs=0.05)
    assert eval_rows[1]["train_loss"] < eval_rows[0]["train_loss"] - 0.3


def _hf_folder(path, n_layer=2):
    config = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=n_layer, n_head=4)
    hf.save_hf(str(path), config, jax.device_get(init_params(config, jax.random.key(0))))
    return str(path)


def test_a_shape_from_init_from_names_the_config_keys_it_overrides(shards, tmp_path):
    folder = _hf_folder(tmp_path / "hf")
    p = plan_lib.plan(tiny(shards, init_from=f"hf:{folder}", **{"model.n_layer": 12, "model.n_embd": 768,
                                                                 "model.n_head": 12}))  # fmt: skip
    assert p.model.n_layer == 2 and p.model.n_embd == 64
    assert p.notes == (f"note: model shape from hf:{folder} overrides model.n_layer 12 -> 2, model.n_head 12 -> 4, "
                       "model.n_embd 768 -> 64",)  # fmt: skip
    assert plan_lib.plan(tiny(shards, init_from=f"hf:{folder}")).notes == ()  # the config agrees: nothing to say


def test_a_hub_id_offline_is_one_line_that_says_what_to_run(shards, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(plan_lib.ConfigError) as e:
        plan_lib.plan(tiny(shards, init_from="hf:gpt2"))
    assert str(e.value) == ("init_from 'hf:gpt2': not a folder, and the hub is unreachable/offline; download it "
                            "with: hf download gpt2 --local-dir PATH, then init_from=hf:PATH "
                            "(offline mode: HF_HUB_OFFLINE=1)")  # fmt: skip


def test_a_hub_id_is_downloaded_through_huggingface_hub(shards, tmp_path, monkeypatch):
    import huggingface_hub

    folder, asked = _hf_folder(tmp_path / "snapshot", n_layer=1), []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        return folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    p = plan_lib.plan(tiny(shards, init_from="hf:openai-community/gpt2", **{"model.n_layer": 1}))
    [(repo_id, kwargs)] = asked
    assert repo_id == "openai-community/gpt2" and {"config.json", "*.safetensors"} <= set(kwargs["allow_patterns"])
    assert p.hf_path == folder and p.model.n_layer == 1  # the shape came from the snapshot's config.json
    assert p.notes == (f"note: init_from 'hf:openai-community/gpt2': weights from the hub, in {folder}",)
