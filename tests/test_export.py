"""The export CLI: a workdir checkpoint becomes an HF folder that transformers uses offline."""

import os

import jax
import numpy as np
import optax
import torch
import transformers

from gpt2_jax import export
from gpt2_jax.checkpoint import Checkpoints
from gpt2_jax.cli import run
from gpt2_jax.hf import load_hf
from gpt2_jax.steps import TrainState
from hf_reference import hf_logits, hf_model, save_folder


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
