"""The Flax GPT-2 against transformers' GPT2LMHeadModel, and its own invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import hf_logits, hf_model, save_folder

from gpt2_jax.interop.hf import load_hf
from gpt2_jax.model import (
    GPT2,
    GPT2Config,
    abstract_params,
    attention_kernel,
    attention_problem,
    count_params,
    cross_entropy,
    init_cache,
    init_params,
    logical_axes,
    loss_fn,
)

PARITY_CASES = [
    dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
    dict(n_embd=60, n_layer=3, n_head=5, n_positions=32),  # odd head count
    dict(n_embd=48, n_layer=1, n_head=3, n_positions=16),  # odd heads, short context
    dict(n_embd=32, n_layer=2, n_head=1, n_positions=24, vocab_size=1000),
]


def _random_tokens(shape, vocab=50257, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: f"D{c['n_embd']}-H{c['n_head']}-P{c['n_positions']}")
def test_logits_match_transformers_float32(case, tmp_path):
    model = hf_model(**case)
    config, params = load_hf(save_folder(model, tmp_path))
    tokens = _random_tokens((3, case["n_positions"]), case.get("vocab_size", 50257))
    ref = hf_logits(model, tokens)
    ours = np.asarray(GPT2(config).apply({"params": params}, jnp.asarray(tokens)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # the weights make logits large enough to show a mismatch
    assert np.abs(ours - ref).max() <= 1e-4


def test_bfloat16_compute_close_to_float32_reference(tmp_path):
    model = hf_model()
    config, params = load_hf(save_folder(model, tmp_path), dtype="bfloat16")
    tokens = _random_tokens((2, 64))
    ref = hf_logits(model, tokens)
    ours = np.asarray(GPT2(config).apply({"params": params}, jnp.asarray(tokens)))
    assert ours.dtype == np.float32  # logits stay float32 whatever the compute dtype
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"bfloat16 compute: max |logits - transformers float32| / max |logits| = {rel:.2e}")
    assert 0 < rel < 3e-2  # bfloat16 has 8 mantissa bits; the error is real but small
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def _tiny(**kw):
    return GPT2Config.from_preset("tiny", **kw)


def test_causal_future_tokens_do_not_change_past_logits():
    config = _tiny()
    params = init_params(config, jax.random.key(0))
    tokens = _random_tokens((2, 32))
    changed = tokens.copy()
    changed[:, 20:] = _random_tokens((2, 12), seed=1)
    a = GPT2(config).apply({"params": params}, tokens)
    b = GPT2(config).apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :20]), np.asarray(b[:, :20]))
    assert np.abs(np.asarray(a[:, 20:] - b[:, 20:])).max() > 1e-3


def test_jit_and_eager_agree():
    config = _tiny()
    params = init_params(config, jax.random.key(1))
    tokens = jnp.asarray(_random_tokens((2, 16)))
    apply = lambda p, t: GPT2(config).apply({"params": p}, t)  # noqa: E731
    np.testing.assert_allclose(np.asarray(apply(params, tokens)), np.asarray(jax.jit(apply)(params, tokens)), atol=1e-5)


@pytest.mark.parametrize(
    "preset, expected",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_parameter_counts_of_presets(preset, expected):
    assert count_params(abstract_params(GPT2Config.from_preset(preset))) == expected


def test_initialisation_follows_gpt2():
    config = _tiny(n_layer=8, n_embd=128)
    p = init_params(config, jax.random.key(0))
    resid_std = 0.02 / np.sqrt(2 * config.n_layer)
    for i in range(config.n_layer):
        blk = p[f"h_{i}"]
        np.testing.assert_allclose(np.std(blk["attn"]["c_proj"]["kernel"]), resid_std, rtol=0.1)
        np.testing.assert_allclose(np.std(blk["mlp"]["c_proj"]["kernel"]), resid_std, rtol=0.1)
        np.testing.assert_allclose(np.std(blk["attn"]["c_attn"]["kernel"]), 0.02, rtol=0.1)
        np.testing.assert_allclose(np.std(blk["mlp"]["c_fc"]["kernel"]), 0.02, rtol=0.1)
        assert not np.any(blk["attn"]["c_attn"]["bias"]) and not np.any(blk["mlp"]["c_fc"]["bias"])
        np.testing.assert_array_equal(blk["ln_1"]["scale"], 1.0)
        np.testing.assert_array_equal(blk["ln_1"]["bias"], 0.0)
    np.testing.assert_allclose(np.std(p["wte"]), 0.02, rtol=0.05)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))


def test_vocab_padding_never_wins_and_keeps_real_logits():
    plain = _tiny()
    padded = _tiny(vocab_pad_multiple=128)
    assert padded.padded_vocab_size == 50304
    params = init_params(padded, jax.random.key(0))
    assert not np.any(params["wte"][plain.vocab_size :])  # padding rows start at zero
    tokens = jnp.asarray(_random_tokens((2, 16)))
    logits = np.asarray(GPT2(padded).apply({"params": params}, tokens))
    assert logits.shape[-1] == 50304
    assert (logits.argmax(-1) < 50257).all()
    unpadded = dict(params, wte=params["wte"][: plain.vocab_size])
    ref = np.asarray(GPT2(plain).apply({"params": unpadded}, tokens))
    np.testing.assert_allclose(logits[..., :50257], ref, atol=1e-6)
    # the loss over a padded head equals the loss over the real vocabulary
    targets = jnp.asarray(_random_tokens((2, 16), seed=3))
    np.testing.assert_allclose(cross_entropy(logits, targets), cross_entropy(ref, targets), rtol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_changes_nothing_numerically(remat):
    tokens = jnp.asarray(_random_tokens((2, 16)))
    targets = jnp.asarray(_random_tokens((2, 16), seed=2))
    params = init_params(_tiny(), jax.random.key(0))

    def grads(config):
        return jax.jit(jax.grad(lambda p: loss_fn(GPT2(config), p, tokens, targets)))(params)

    ga, gb = grads(_tiny()), grads(_tiny(remat=remat))
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_dropout_is_off_by_default_and_random_when_training():
    tokens = jnp.asarray(_random_tokens((2, 16)))
    config = _tiny(dropout=0.1)
    params = init_params(config, jax.random.key(0))
    model = GPT2(config)
    eval_a = model.apply({"params": params}, tokens)
    eval_b = model.apply({"params": params}, tokens, deterministic=True)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_1 = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    train_1b = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    train_2 = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(np.asarray(train_1), np.asarray(train_1b))
    assert np.abs(np.asarray(train_1 - train_2)).max() > 1e-4
    assert np.abs(np.asarray(train_1 - eval_a)).max() > 1e-4


def test_cross_entropy_matches_torch():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 5, 11).astype(np.float32) * 3
    targets = rng.randint(0, 11, (2, 5))
    weights = rng.randint(0, 2, (2, 5)).astype(np.float32)
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 11), torch.tensor(targets).reshape(-1))
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(targets)), ref.item(), rtol=1e-6)
    per_token = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 11), torch.tensor(targets).reshape(-1), reduction="none"
    ).numpy()
    expected = (per_token * weights.reshape(-1)).sum() / weights.sum()
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_every_parameter_has_logical_axis_names_of_its_rank():
    config = _tiny()
    shapes = abstract_params(config)
    axes = logical_axes(config)
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    assert len(flat_axes) == len(flat_shapes)
    for path, shape in flat_shapes:
        assert len(flat_axes[path]) == len(shape.shape), path
    assert tuple(axes["wte"]) == ("vocab", "embed")
    assert tuple(axes["h_0"]["mlp"]["c_fc"]["kernel"]) == ("embed", "mlp")


@pytest.mark.parametrize("bad, message", [
    (dict(n_embd=65, n_head=4), "divisible"),
    (dict(dtype="float16"), "dtype"),
    (dict(remat="sometimes"), "remat"),
    (dict(attention="flash"), "attention"),
    (dict(loss_chunk=-1), "loss_chunk"),
])
def test_invalid_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**bad)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPT2Config.from_preset("gpt3")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_decoding_matches_the_full_forward(dtype):
    config = _tiny(dtype=dtype)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(_random_tokens((3, 20)))
    full = np.asarray(GPT2(config).apply({"params": params}, tokens))

    @jax.jit
    def step(cache, t):
        return GPT2(config).apply({"params": params, "cache": cache}, t, decode=True, mutable=["cache"])

    logits, state = step(init_cache(config, 3, max_length=32), tokens[:, :12])  # prefill
    pieces = [np.asarray(logits)]
    for i in range(12, 20):  # one token at a time through the cache
        logits, state = step(state["cache"], tokens[:, i : i + 1])
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5 if dtype == "float32" else 2e-2)
    assert state["cache"]["h_0"]["attn"]["index"].tolist() == [20, 20, 20]
    assert state["cache"]["position"].tolist() == [20, 20, 20]


def test_rows_of_one_cache_at_different_positions_each_match_their_own_forward():
    """Per-row positions: prompts of 3, 7 and 12 tokens right-padded into one prefill, each row
    continued from its own length (set_positions), the rows moved to another cache (take_rows,
    insert_rows) and decoded on there: every row's logits equal the full forward of its own
    sequence, so prompts of different lengths share a batch."""
    from gpt2_jax.model.cache import insert_rows, set_positions, take_rows

    config = _tiny()
    params = init_params(config, jax.random.key(0))
    lengths = [3, 7, 12]
    tokens = _random_tokens((3, 20), seed=1)

    @jax.jit
    def step(cache, t):
        return GPT2(config).apply({"params": params, "cache": cache}, t, decode=True, mutable=["cache"])

    logits, state = step(init_cache(config, 3, 12), jnp.asarray(tokens[:, :12]))  # padding past each length
    got = {row: [logits[row, n - 1]] for row, n in enumerate(lengths)}
    cache = set_positions(state["cache"], lengths)
    cache = take_rows(cache, jnp.array([2, 0, 1]), 32)  # reordered, with room for 20 more positions
    cache = insert_rows(init_cache(config, 4, 32), cache, jnp.array([3, 0, 1]))  # into a 4-row batch
    rows_of_slots = [0, 1, None, 2]  # slot 2 holds nothing
    for i in range(6):  # each row feeds its own next token, at its own position
        feed = np.zeros((4, 1), np.int32)
        for slot, row in enumerate(rows_of_slots):
            if row is not None:
                feed[slot, 0] = tokens[row, lengths[row] + i]
        logits, state = step(cache, jnp.asarray(feed))
        cache = state["cache"]
        for slot, row in enumerate(rows_of_slots):
            if row is not None:
                got[row].append(logits[slot, 0])
    for row, n in enumerate(lengths):
        full = np.asarray(GPT2(config).apply({"params": params}, jnp.asarray(tokens[row : row + 1, : n + 6])))[0]
        np.testing.assert_allclose(np.stack(got[row]), full[n - 1 : n + 6], atol=2e-5)
    assert cache["position"].tolist() == [9, 13, 6, 18]
    assert cache["h_1"]["attn"]["index"].tolist() == [9, 13, 6, 18]


def test_decoding_past_the_end_of_the_cache_is_an_error_never_wrong_logits():
    """dynamic_update_slice clamps its index: a write past the end would overwrite the last
    cached positions and give finite, wrong logits. Eagerly it raises; under jit every token of
    the step that overflows (and of every step after it) gets NaN logits."""
    config = _tiny()
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(_random_tokens((2, 10)))

    def step(cache, t):
        return GPT2(config).apply({"params": params, "cache": cache}, t, decode=True, mutable=["cache"])

    jitted = jax.jit(step)
    logits, full = jitted(init_cache(config, 2, max_length=8), tokens[:, :8])  # exactly fills the cache
    assert np.isfinite(np.asarray(logits)).all()
    logits, over = jitted(full["cache"], tokens[:, 8:9])  # one token past the end
    assert np.isnan(np.asarray(logits)).all()
    logits, _ = jitted(over["cache"], tokens[:, 9:10])  # and it stays an error
    assert np.isnan(np.asarray(logits)).all()
    _, part = jitted(init_cache(config, 2, max_length=8), tokens[:, :6])
    logits, _ = jitted(part["cache"], tokens[:, 6:9])  # 2 of 3 fit: the whole step is refused
    assert np.isnan(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="past the end of the 8-position KV cache"):
        step(full["cache"], tokens[:, 8:9])  # concrete index: a plain error
    with pytest.raises(ValueError, match="9 tokens do not fit the 8-position KV cache"):
        jitted(init_cache(config, 2, max_length=8), tokens[:, :9])  # known while tracing
    with pytest.raises(ValueError, match="between 1 and the 128 positions"):
        init_cache(config, 2, max_length=129)
    # per row: the row that overflows gets NaN, the others keep their logits
    from gpt2_jax.model.cache import set_positions

    logits, _ = jitted(set_positions(full["cache"], [8, 5]), tokens[:, 8:9])
    assert np.isnan(np.asarray(logits[0])).all() and np.isfinite(np.asarray(logits[1])).all()


# --- the chunked loss: same loss and gradients as the full logits, less memory ------------------


@pytest.mark.parametrize("chunk, pad, weighted, dtype", [
    (8, 1, False, "float32"),  # 24 positions = 3 whole chunks
    (5, 1, True, "float32"),  # remainder chunk (24 = 4 x 5 + 4), weights
    (7, 128, True, "float32"),  # remainder, padded vocabulary (masked columns), weights
    (64, 128, False, "float32"),  # one chunk longer than the sequence
    (8, 128, True, "bfloat16"),
])
def test_chunked_loss_equals_the_plain_loss_and_gradients(chunk, pad, weighted, dtype):
    plain = _tiny(vocab_pad_multiple=pad, dtype=dtype)
    chunked = plain.replace(loss_chunk=chunk)
    params = init_params(plain, jax.random.key(0))
    # a large-ish embedding so that logits (and the padded columns' mask) matter
    params = dict(params, wte=params["wte"] * 20)
    tokens = jnp.asarray(_random_tokens((3, 24)))
    targets = jnp.asarray(_random_tokens((3, 24), seed=5))
    weights = jnp.asarray(np.random.RandomState(0).rand(3, 24) > 0.4, jnp.float32) if weighted else None

    def value_and_grad(config):
        f = lambda p: loss_fn(GPT2(config), p, tokens, targets, weights)  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    (la, ga), (lb, gb) = value_and_grad(plain), value_and_grad(chunked)
    assert float(la) > 1.0
    rtol = 1e-6 if dtype == "float32" else 1e-3  # the same bf16 matmuls, summed in another order
    np.testing.assert_allclose(float(lb), float(la), rtol=rtol)
    for path, a in jax.tree_util.tree_leaves_with_path(ga):
        b = dict(jax.tree_util.tree_leaves_with_path(gb))[path]
        scale = np.abs(np.asarray(a)).max()
        assert scale > 0, path
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=(1e-5 if dtype == "float32" else 2e-2) * scale)


def test_chunked_loss_never_materialises_the_whole_logits():
    # the compiled loss+gradient holds no (B, T, V) float32 array, only (B, chunk, V) ones
    config = _tiny(loss_chunk=4)
    params = init_params(config, jax.random.key(0))
    tokens = targets = jnp.zeros((2, 32), jnp.int32)
    grad = jax.jit(jax.grad(lambda p: loss_fn(GPT2(config), p, tokens, targets)))
    hlo = grad.lower(params).compile().as_text()
    assert "f32[2,32,50257]" not in hlo and "f32[2,4,50257]" in hlo
    plain = jax.jit(jax.grad(lambda p: loss_fn(GPT2(config.replace(loss_chunk=0)), p, tokens, targets)))
    assert "f32[2,32,50257]" in plain.lower(params).compile().as_text()


def test_hidden_states_through_the_head_are_the_logits():
    from gpt2_jax.model import lm_head

    config = _tiny(vocab_pad_multiple=128)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(_random_tokens((2, 16)))
    hidden = GPT2(config).apply({"params": params}, tokens, return_hidden=True)
    assert hidden.shape == (2, 16, config.n_embd)
    logits = GPT2(config).apply({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(lm_head(hidden, params["wte"], config)), np.asarray(logits))


# --- fast paths: each gives the plain path's loss and gradients ---------------------------------


def _loss_and_grads(config, params, tokens, targets, mesh_shape=None):
    from gpt2_jax.parallel import sharding

    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(GPT2(config), p, tokens, targets)))
    if mesh_shape is None:
        return f(params)
    with sharding.use_mesh(sharding.make_mesh(mesh_shape), sharding.DEFAULT_RULES):
        return f(params)


def _assert_same_loss_and_grads(a, b, rtol, atol):
    (la, ga), (lb, gb) = a, b
    np.testing.assert_allclose(float(lb), float(la), rtol=rtol)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.abs(x).max() > 0
        np.testing.assert_allclose(y, x, atol=atol * np.abs(x).max())


@pytest.mark.parametrize("mesh_shape", [None, (2, 1, 2)], ids=["one-device", "mesh-data2-tensor2"])
def test_pallas_splash_attention_equals_xla(mesh_shape):
    # Off TPU the kernel runs in Pallas interpret mode: its numbers, not its speed, are tested.
    tokens = jnp.asarray(_random_tokens((2, 128)))
    targets = jnp.asarray(_random_tokens((2, 128), seed=2))
    params = init_params(_tiny(), jax.random.key(0))
    plain = _loss_and_grads(_tiny(), params, tokens, targets)
    fast = _loss_and_grads(_tiny(attention="pallas"), params, tokens, targets, mesh_shape)
    _assert_same_loss_and_grads(plain, fast, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("where, overrides, kernel", [
    ("cuda", dict(dtype="bfloat16"), "cudnn"),
    ("cuda", dict(dtype="float32"), "xla"),  # cuDNN has no float32 flash kernel
    ("cuda", dict(dtype="bfloat16", n_embd=60, n_head=4), "xla"),  # head size 15: not a multiple of 8
    ("cuda", dict(dtype="bfloat16", n_embd=1056, n_head=4), "xla"),  # head size 264 > 128
    ("rocm", dict(dtype="bfloat16"), "xla"),
    ("tpu", dict(dtype="bfloat16"), "pallas"),  # splash: lowers through Mosaic for TPU topologies (issue 19)
    ("cpu", dict(dtype="bfloat16"), "xla"),
])
def test_auto_attention_picks_cudnn_only_where_it_runs(where, overrides, kernel):
    config = _tiny(**overrides)
    assert config.attention == "auto"
    assert attention_kernel(config, where) == kernel
    for named in ("xla", "cudnn", "pallas"):  # a named kernel is taken as named
        assert attention_kernel(config.replace(attention=named), where) == named


def test_attention_problems_name_what_is_missing():
    bf16 = _tiny(dtype="bfloat16")
    assert attention_problem(bf16, "cudnn", "cuda") is None
    assert attention_problem(bf16, "cudnn", "cpu") == "needs an NVIDIA GPU (this process runs on cpu)"
    assert "needs dtype 'bfloat16'" in attention_problem(_tiny(), "cudnn", "cuda")
    assert attention_problem(bf16, "pallas", "tpu") is None
    assert "is a TPU kernel" in attention_problem(bf16, "pallas", "cuda")
    assert attention_problem(_tiny(), "xla", "cpu") is None and attention_problem(_tiny(), "auto", "cpu") is None


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_attention_equals_xla_in_bfloat16():
    tokens = jnp.asarray(_random_tokens((4, 128)))
    targets = jnp.asarray(_random_tokens((4, 128), seed=2))
    params = init_params(_tiny(), jax.random.key(0))
    plain = _loss_and_grads(_tiny(dtype="bfloat16", attention="xla"), params, tokens, targets)  # 'auto' is cudnn here
    fast = _loss_and_grads(_tiny(dtype="bfloat16", attention="cudnn"), params, tokens, targets)
    _assert_same_loss_and_grads(plain, fast, rtol=1e-2, atol=3e-2)


def test_padded_vocabulary_gives_the_same_loss_and_gradients():
    tokens = jnp.asarray(_random_tokens((2, 16)))
    targets = jnp.asarray(_random_tokens((2, 16), seed=3))
    padded = _tiny(vocab_pad_multiple=128)
    params = init_params(padded, jax.random.key(0))
    unpadded = dict(params, wte=params["wte"][:50257])
    lp, gp = _loss_and_grads(padded, params, tokens, targets)
    assert not np.any(np.asarray(gp["wte"][50257:]))  # padding rows never learn
    gp = dict(gp, wte=gp["wte"][:50257])
    _assert_same_loss_and_grads(_loss_and_grads(_tiny(), unpadded, tokens, targets), (lp, gp), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_gives_the_same_loss_and_gradients(remat):
    tokens = jnp.asarray(_random_tokens((2, 16)))
    targets = jnp.asarray(_random_tokens((2, 16), seed=2))
    params = init_params(_tiny(), jax.random.key(0))
    _assert_same_loss_and_grads(_loss_and_grads(_tiny(), params, tokens, targets),
                                _loss_and_grads(_tiny(remat=remat, loss_chunk=8), params, tokens, targets),
                                rtol=1e-6, atol=1e-5)  # fmt: skip
