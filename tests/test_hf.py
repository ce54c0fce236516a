"""HF folder <-> gpt2_jax conversion: exact round trips, transformers loading, clear errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_logits, hf_model, save_folder
from safetensors.numpy import load_file, save_file

from gpt2_jax import GPT2, get_tokenizer, load_hf, save_hf
from gpt2_jax.interop.hf import HFFormatError

ODD_TEXT = (
    "Hello world! Héllo wörld.  Ünïcödé\n\n\ttabs\t\tand   spaces   \r\n"
    "日本語のテキスト、中文文本，한국어 텍스트. Ελληνικά, русский, العربية, עברית, हिन्दी.\n"
    "Emoji: 🤖🚀👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ — “quotes” ‘single’ … ¡¿ 1234567890 3.14159\n"
    "code:  def f(x):\n        return x ** 2  # comment\n'll 've 're 's 't 'd 'm\u00a0nbsp\u200bzwsp"
)


def test_round_trip_hf_to_jax_to_hf_is_identical(tmp_path):
    model = hf_model(n_layer=3, n_head=5, n_embd=60)
    config, params = load_hf(save_folder(model, tmp_path / "in"))
    save_hf(str(tmp_path / "out"), config, params)
    original = load_file(str(tmp_path / "in" / "model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(exported) == {k for k in original if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    for k, v in exported.items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, original[k], err_msg=k)


def test_exported_folder_loads_offline_in_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = hf_model()
    config, params = load_hf(save_folder(model, tmp_path / "in"))
    out = str(tmp_path / "out")
    save_hf(out, config, params)
    assert {"config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
            "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(out))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = np.random.RandomState(0).randint(0, 50257, (2, 32))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(ODD_TEXT)["input_ids"]
    assert ids == get_tokenizer().encode(ODD_TEXT)
    assert tokenizer.decode(ids) == ODD_TEXT
    assert tokenizer.eos_token_id == 50256


def test_vocab_padding_is_trimmed_on_export(tmp_path):
    model = hf_model()
    config, params = load_hf(save_folder(model, tmp_path / "in"), vocab_pad_multiple=128)
    assert params["wte"].shape == (50304, 64) and not params["wte"][50257:].any()
    tokens = np.random.RandomState(1).randint(0, 50257, (1, 16))
    logits = np.asarray(GPT2(config).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(logits[..., :50257], hf_logits(model, tokens), atol=1e-4)
    save_hf(str(tmp_path / "out"), config, params)
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["transformer.wte.weight"].shape == (50257, 64)
    assert json.load(open(tmp_path / "out" / "config.json"))["vocab_size"] == 50257


def test_keys_without_transformer_prefix_and_with_buffers_load(tmp_path):
    model = hf_model()
    folder = save_folder(model, tmp_path / "in")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old causal buffer
    renamed["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    renamed["lm_head.weight"] = renamed["wte.weight"]
    save_file(renamed, os.path.join(folder, "model.safetensors"))
    _, params = load_hf(folder)
    np.testing.assert_array_equal(params["wte"], tensors["transformer.wte.weight"])


def test_pytorch_bin_loads_with_weights_only(tmp_path):
    model = hf_model()
    folder = tmp_path / "bin"
    folder.mkdir()
    model.config.save_pretrained(str(folder))
    torch.save(model.state_dict(), str(folder / "pytorch_model.bin"))
    config, params = load_hf(str(folder))
    tokens = np.random.RandomState(2).randint(0, 50257, (2, 16))
    ours = np.asarray(GPT2(config).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=1e-4)


def _edit_tensors(folder, edit):
    file = os.path.join(folder, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_tensor_is_named(tmp_path):
    folder = save_folder(hf_model(), tmp_path / "m")
    _edit_tensors(folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(HFFormatError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.bias'"):
        load_hf(folder)


def test_mismatched_shape_is_named(tmp_path):
    folder = save_folder(hf_model(), tmp_path / "m")
    _edit_tensors(folder, lambda t: t.update({"transformer.h.0.attn.c_proj.weight": np.zeros((64, 32), np.float32)}))
    with pytest.raises(HFFormatError, match=r"'h\.0\.attn\.c_proj\.weight' has shape \(64, 32\), expected \(64, 64\)"):
        load_hf(folder)


def test_untied_head_and_foreign_models_are_refused(tmp_path):
    folder = save_folder(hf_model(), tmp_path / "m")
    _edit_tensors(folder, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}))
    with pytest.raises(HFFormatError, match="lm_head"):
        load_hf(folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    json.dump(dict(cfg, activation_function="relu"), open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(HFFormatError, match="activation_function"):
        load_hf(folder)
    json.dump(dict(cfg, model_type="llama"), open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(HFFormatError, match="model_type"):
        load_hf(folder)


def test_folders_without_a_model_are_refused(tmp_path):
    with pytest.raises(HFFormatError, match="no config.json"):
        load_hf(str(tmp_path))
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(str(tmp_path))
    with pytest.raises(HFFormatError, match="no model.safetensors"):
        load_hf(str(tmp_path))


def test_save_refuses_a_non_empty_folder_and_leaves_nothing_behind(tmp_path):
    config, params = load_hf(save_folder(hf_model(), tmp_path / "in"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(str(out), config, params)
    assert os.listdir(out) == ["keep.txt"]
    broken = dict(params)
    del broken["ln_f"]
    with pytest.raises(KeyError):
        save_hf(str(tmp_path / "new"), config, broken)
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # no temporary folder left
    save_hf(str(out), config, params, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
