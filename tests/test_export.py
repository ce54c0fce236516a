"""The export CLI: a workdir checkpoint becomes an HF folder that transformers uses offline."""

import os

import jax
import numpy as np
import optax
import torch
import transformers
from hf_reference import hf_logits, hf_model, save_folder

from gpt2_jax.cli import run
from gpt2_jax.interop.checkpoint import Checkpoints
from gpt2_jax.interop.hf import load_hf
from gpt2_jax.tools import export
from gpt2_jax.train.steps import TrainState


def _workdir(tmp_path, config, params, steps=(4, 8)):
    ckpts = Checkpoints(str(tmp_path / "run"))
    for step in steps:
        state = TrainState.create(apply_fn=None, params=jax.tree_util.tree_map(lambda x: x * step, params),
                                  tx=optax.adamw(1e-3), dropout_key=np.zeros(2, np.uint32))
        ckpts.save(step, state, {"next_batch": step}, {}, config)
    ckpts.close()
    return str(tmp_path / "run")


def test_export_loads_in_a_transformers_pipeline_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = hf_model(n_positions=64, scale=0.3)
    config, params = load_hf(save_folder(reference, tmp_path / "hf"), vocab_pad_multiple=128, dtype="bfloat16")
    workdir = _workdir(tmp_path, config, params, steps=(1, 2))
    out = str(tmp_path / "export")
    assert run(export.main, ["--workdir", workdir, "--step", "1", "--out", out]) == 0
    exported = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = np.random.RandomState(0).randint(0, 50257, (2, 16))
    np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(reference, tokens))
    assert exported.config.vocab_size == 50257 and exported.dtype == torch.float32
    pipe = transformers.pipeline("text-generation", model=out, device="cpu")
    text = pipe("Hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello") and len(text) > len("Hello")


def test_latest_step_by_default_and_no_clobbering(tmp_path, capsys):
    config, params = load_hf(save_folder(hf_model(), tmp_path / "hf"))
    workdir = _workdir(tmp_path, config, params)
    out = tmp_path / "export"
    assert run(export.main, ["--workdir", workdir, "--out", str(out)]) == 0
    assert f"@8 to {out}" in capsys.readouterr().out
    _, exported = load_hf(str(out))
    np.testing.assert_array_equal(exported["wpe"], params["wpe"] * 8)
    assert run(export.main, ["--workdir", workdir, "--out", str(out)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert run(export.main, ["--workdir", workdir, "--step", "4", "--out", str(out), "--overwrite"]) == 0
    np.testing.assert_array_equal(load_hf(str(out))[1]["wpe"], params["wpe"] * 4)


def test_missing_workdir_writes_nothing(tmp_path, capsys):
    out = tmp_path / "export"
    assert run(export.main, ["--workdir", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not os.path.exists(out)
    assert os.listdir(tmp_path) == []


def test_train_export_and_transformers_agree_with_evaluate(shards, tmp_path, capsys, monkeypatch):
    """20 trained steps -> export -> transformers' loss on a validation batch equals evaluate's on
    the checkpoint within 1e-4; the exported tokenizer encodes as tiktoken does."""
    import json

    from runs import tiny

    from gpt2_jax.interop.tokenizer import get_tokenizer
    from gpt2_jax.tools import evaluate
    from gpt2_jax.train import cli as train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    train.train_and_evaluate(tiny(shards, total_steps=20), workdir)
    capsys.readouterr()
    assert run(export.main, ["--workdir", workdir, "--out", out]) == 0
    capsys.readouterr()
    assert run(evaluate.main, ["--workdir", workdir, "--data", shards, "--block_size", "32", "--batch_size", "4",
                               "--max_batches", "1"]) == 0  # fmt: skip
    ours = json.loads(capsys.readouterr().out)
    assert ours["step"] == 20 and ours["tokens"] == 4 * 32

    with open(os.path.join(shards, "val_000000.bin"), "rb") as f:
        tokens = np.frombuffer(f.read(), np.uint16, offset=1024).astype(np.int64)
    windows = torch.as_tensor(np.stack([tokens[i * 32 : i * 32 + 33] for i in range(4)]))  # evaluate's first batch
    exported = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        logits = exported(windows[:, :-1]).logits
        theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert abs(theirs.item() - ours["loss"]) <= 1e-4 * ours["loss"]
    assert ours["loss"] < 5.0  # trained: below the uniform log(512) = 6.2

    text = "Hello world! Ünïcödé, emoji 🎉 and   spaces\n\tend"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.encode(text) == get_tokenizer().encode(text)
