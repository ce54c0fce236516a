"""Scanned layers (model.scan_layers): the same model as the unrolled one, through loss, gradients, HF and decoding."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_logits, hf_model, save_folder

from gpt2_jax.infer.sampling import Sampler, SamplingConfig
from gpt2_jax.interop.hf import load_hf, params_from_hf_tensors, params_to_hf_tensors
from gpt2_jax.model import GPT2, GPT2Config, init_params, loss_fn, stack_layers, to_layout, unstack_layers

CONFIG = GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=3, n_head=4)


def _batch(config=CONFIG, shape=(2, 16), seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (shape[0], shape[1] + 1), 0, config.vocab_size)
    return tokens[:, :-1], tokens[:, 1:]


def test_scanned_params_are_the_unrolled_ones_stacked():
    scanned = init_params(CONFIG.replace(scan_layers=True), jax.random.key(0))
    assert sorted(scanned) == ["h", "ln_f", "wpe", "wte"]
    assert scanned["h"]["attn"]["c_attn"]["kernel"].shape == (3, 64, 3, 4, 16)
    assert scanned["h"]["ln_1"]["scale"].shape == (3, 64)
    assert not np.array_equal(scanned["h"]["mlp"]["c_fc"]["kernel"][0], scanned["h"]["mlp"]["c_fc"]["kernel"][1])
    unrolled = unstack_layers(scanned)
    assert sorted(unrolled) == ["h_0", "h_1", "h_2", "ln_f", "wpe", "wte"]
    back = stack_layers(unrolled, 3)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(scanned)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("remat", ["none", "full", "save_qkv_proj", "save_attn_out"])
def test_scan_equals_unrolled_in_loss_and_gradients(remat):
    params = init_params(CONFIG, jax.random.key(0))
    inputs, targets = _batch()
    loss, grads = jax.value_and_grad(lambda p: loss_fn(GPT2(CONFIG), p, inputs, targets))(params)
    scanned = CONFIG.replace(scan_layers=True, remat=remat)
    s_loss, s_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(GPT2(scanned), p, inputs, targets)))(
        stack_layers(params, CONFIG.n_layer))
    np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
    expected = stack_layers(grads, CONFIG.n_layer)
    flat, _ = jax.tree_util.tree_flatten_with_path(expected)
    for (path, g), s in zip(flat, jax.tree_util.tree_leaves(s_grads)):
        np.testing.assert_allclose(s, g, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_hf_round_trip_and_parity_with_scanned_layers(tmp_path):
    model = hf_model(n_layer=3, n_head=4, n_embd=64, vocab_size=300)
    folder = save_folder(model, tmp_path / "in")
    config, params = load_hf(folder, scan_layers=True)
    assert config.scan_layers and params["h"]["attn"]["c_attn"]["kernel"].shape == (3, 64, 3, 4, 16)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 20)).astype(np.int32)
    logits = GPT2(config).apply({"params": params}, jnp.asarray(tokens))
    assert np.abs(np.asarray(logits)[..., :300] - hf_logits(model, tokens)).max() <= 1e-4
    tensors = params_to_hf_tensors(config, params)
    original = {f"transformer.{k}": v.detach().numpy() for k, v in model.transformer.state_dict().items()
                if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # fmt: skip
    assert set(tensors) == set(original)
    for k, v in tensors.items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)
    again = params_from_hf_tensors(config, tensors)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_to_layout_upgrades_the_flat_c_attn_of_older_checkpoints():
    params = init_params(CONFIG, jax.random.key(0))
    flat = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(CONFIG.n_layer):
        attn = dict(flat[f"h_{i}"]["attn"])
        attn["c_attn"] = {"kernel": params[f"h_{i}"]["attn"]["c_attn"]["kernel"].reshape(64, 192),
                          "bias": params[f"h_{i}"]["attn"]["c_attn"]["bias"].reshape(192)}  # fmt: skip
        flat[f"h_{i}"] = {**flat[f"h_{i}"], "attn": attn}
    for scan in (False, True):
        config = CONFIG.replace(scan_layers=scan)
        want = stack_layers(params, 3) if scan else params
        got = to_layout(flat, config)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(a, b)


def test_generation_with_scanned_layers_matches_unrolled():
    config = CONFIG.replace(n_positions=64)
    params = init_params(config, jax.random.key(3))
    prompts = np.asarray(jax.random.randint(jax.random.key(4), (3, 5), 0, config.vocab_size))
    greedy = SamplingConfig(temperature=0)
    want = Sampler(config, params, greedy).generate(prompts, 12, jax.random.key(0), stop_at_eot=False)
    scanned = config.replace(scan_layers=True)
    got = Sampler(scanned, stack_layers(params, 3), greedy).generate(prompts, 12, jax.random.key(0), stop_at_eot=False)
    assert got == want and len(want[0]) == 12
    sampled = SamplingConfig(temperature=1.0, top_k=20)
    want = Sampler(config, params, sampled).generate(prompts, 8, jax.random.key(5), stop_at_eot=False)
    got = Sampler(scanned, stack_layers(params, 3), sampled).generate(prompts, 8, jax.random.key(5), stop_at_eot=False)
    assert got == want


def test_cache_rows_move_with_the_layer_axis_in_front():
    from gpt2_jax.model.cache import init_cache, insert_rows, set_positions, take_rows

    config = CONFIG.replace(scan_layers=True)
    cache = init_cache(config, 4, 16)
    assert cache["h"]["attn"]["key"].shape == (3, 4, 16, 4, 16) and cache["position"].shape == (4,)
    rows = jax.tree_util.tree_map(lambda x: x + 1, init_cache(config, 2, 8))
    rows = set_positions(rows, jnp.array([5, 7]))
    cache = insert_rows(cache, rows, jnp.array([2, 0]))
    assert cache["h"]["attn"]["index"].tolist() == [[7, 0, 5, 0]] * 3 and cache["position"].tolist() == [7, 0, 5, 0]
    key = np.asarray(cache["h"]["attn"]["key"])
    assert key[:, [0, 2], :8].min() == 1 and key[:, [0, 2], 8:].max() == 0 and key[:, [1, 3]].max() == 0
    taken = take_rows(cache, jnp.array([2]), 32)
    assert taken["h"]["attn"]["key"].shape == (3, 1, 32, 4, 16) and taken["h"]["attn"]["index"].tolist() == [[5]] * 3


def test_resume_with_the_other_layer_layout_is_refused_with_the_setting_that_restores_it():
    from gpt2_jax.train.plan import ConfigError
    from gpt2_jax.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.p = types.SimpleNamespace(model=CONFIG.replace(scan_layers=True))
    ckpts = types.SimpleNamespace(steps=lambda: [4], model_config=lambda step: CONFIG, directory="runs/x/checkpoints")
    with pytest.raises(ConfigError) as e:
        trainer._check_same_model(ckpts)
    assert str(e.value) == ("runs/x/checkpoints holds checkpoints with unrolled layers (model.scan_layers=False); "
                            "resume with --config.model.scan_layers=False, or use another --workdir")  # fmt: skip
    trainer.p = types.SimpleNamespace(model=CONFIG)
    trainer._check_same_model(ckpts)  # the same layout: no complaint


def test_scanned_decoding_past_the_cache_end_is_an_error_as_unrolled():
    """Inside nn.scan every cache index is traced, so the model checks the top-level position."""
    from gpt2_jax.model.cache import init_cache

    for scan in (False, True):
        cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, scan_layers=scan)
        model = GPT2(cfg)
        params = init_params(cfg, jax.random.key(0))
        _, v = model.apply({"params": params, "cache": init_cache(cfg, 1, 8)}, jnp.zeros((1, 6), jnp.int32),
                           decode=True, mutable=["cache"])  # fmt: skip
        with pytest.raises(ValueError, match="at position 6 goes past the end of the 8-position KV cache"):
            model.apply({"params": params, "cache": v["cache"]}, jnp.zeros((1, 3), jnp.int32), decode=True,
                        mutable=["cache"])  # fmt: skip


def test_weight_decay_with_scanned_layers_reaches_matrices_only():
    """Stacking makes every leaf one dimension bigger: LayerNorm scales and biases must stay undecayed."""
    from gpt2_jax.train.optim import decay_mask

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, scan_layers=True)
    params = init_params(cfg, jax.random.key(0))
    flat = {jax.tree_util.keystr(p): (m, x.ndim) for (p, m), x in zip(
        jax.tree_util.tree_leaves_with_path(decay_mask(params)), jax.tree_util.tree_leaves(params), strict=True)}
    decayed = sorted(k for k, (m, _) in flat.items() if m)
    assert decayed == sorted(k for k in flat if k.endswith("['kernel']") or k in ("['wte']", "['wpe']")), decayed
    assert flat["['h']['attn']['c_attn']['bias']"] == (False, 4) and flat["['h']['ln_1']['scale']"] == (False, 2)
