"""Mesh shapes, logical-axis rules and the shardings they give the train state and batches (8 CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gpt2_jax.model import GPT2, GPT2Config
from gpt2_jax.parallel import sharding
from gpt2_jax.train import optim, steps


@pytest.mark.parametrize("axes, n, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 1), 8, (2, 4, 1)),
    ((2, 2, -1), 8, (2, 2, 2)),
    ((1, 1, 1), 1, (1, 1, 1)),
    ((2, 2, 2), 8, (2, 2, 2)),
])
def test_resolve_fills_the_one_free_axis(axes, n, expected):
    assert sharding.resolve_mesh_shape(*axes, num_devices=n) == expected


@pytest.mark.parametrize("axes, match", [
    ((3, 1, 1), "= 3 but there are 8 devices"),
    ((-1, -1, 1), "only one mesh axis may be -1"),
    ((3, -1, 1), "cannot fill mesh.fsdp"),
    ((0, 1, -1), "mesh.data=0 is invalid"),
])
def test_resolve_refuses_shapes_that_do_not_fit(axes, match):
    with pytest.raises(sharding.MeshError, match=match):
        sharding.resolve_mesh_shape(*axes, num_devices=8)


def test_mesh_has_named_auto_axes():
    mesh = sharding.make_mesh((2, 2, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rule_overrides_take_precedence_and_name_real_axes():
    rules = sharding.logical_rules((("embed", None), ("mlp", ["fsdp", "tensor"])))
    assert sharding.mesh_axes_for("embed", rules) == ()
    assert sharding.mesh_axes_for("mlp", rules) == ("fsdp", "tensor")
    assert sharding.mesh_axes_for("heads", rules) == ("tensor",)
    with pytest.raises(sharding.MeshError, match="names no mesh axis"):
        sharding.logical_rules((("embed", "model"),))


def _state_shardings(mesh, config=GPT2Config.from_preset("tiny", vocab_pad_multiple=128)):
    tx = optim.make_optimizer(lambda s: 1e-3)
    abstract, specs = steps.abstract_state(GPT2(config), tx, lambda s: 1e-3)
    return abstract, sharding.logical_to_shardings(specs, mesh, sharding.DEFAULT_RULES)


def test_state_shardings_follow_the_rules_for_params_and_adam_moments():
    mesh = sharding.make_mesh((2, 2, 2))
    abstract, shard = _state_shardings(mesh)
    p = shard.params
    assert p["wte"].spec == P("tensor", "fsdp")
    assert p["wpe"].spec == P(None, "fsdp")
    assert p["h_0"]["attn"]["c_attn"]["kernel"].spec == P("fsdp", None, "tensor", None)  # (D, 3, H, Dh): by heads
    assert p["h_0"]["attn"]["c_attn"]["bias"].spec == P(None, "tensor", None)
    assert p["h_0"]["attn"]["c_proj"]["kernel"].spec == P("tensor", "fsdp")
    assert p["h_0"]["mlp"]["c_fc"]["kernel"].spec == P("fsdp", "tensor")
    assert p["h_0"]["mlp"]["c_fc"]["bias"].spec == P("tensor")
    adam = shard.opt_state[1][0]
    assert adam.mu["wte"].spec == P("tensor", "fsdp") and adam.nu["h_1"]["mlp"]["c_proj"]["kernel"].spec == P("tensor", "fsdp")
    assert shard.step.spec == P() and shard.dropout_key.spec == P()
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(shard)


def test_fsdp_divides_parameter_and_optimizer_memory_per_device():
    def bytes_per_device(mesh_shape):
        abstract, shard = _state_shardings(sharding.make_mesh(mesh_shape))
        leaves = zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shard))
        return sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in leaves)

    replicated, fsdp = bytes_per_device((8, 1, 1)), bytes_per_device((1, 8, 1))
    assert fsdp < replicated / 7  # everything but a few scalars is split 8 ways


def test_state_is_initialised_directly_into_its_shardings():
    mesh = sharding.make_mesh((2, 4, 1))
    config = GPT2Config.from_preset("tiny", vocab_size=512)
    lr = optim.lr_schedule(1e-3, 10, 0)
    tx = optim.make_optimizer(lr)
    _, specs = steps.abstract_state(GPT2(config), tx, lr)
    shard = sharding.logical_to_shardings(specs, mesh, sharding.DEFAULT_RULES)
    state = steps.init_state(GPT2(config), tx, lr, 0, shard)
    wte = state.params["wte"]
    assert wte.sharding == shard.params["wte"]
    assert {s.data.shape for s in wte.addressable_shards} == {(512, 16)}  # embed split over fsdp=4
    assert state.opt_state[1][0].mu["wte"].sharding == shard.params["wte"]


def test_batch_sharding_splits_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.DEFAULT_RULES
    assert sharding.data_parallel_size(mesh, rules) == 4
    assert sharding.batch_sharding(mesh, rules).spec == P(("data", "fsdp"), None)
    assert sharding.batch_sharding(mesh, rules, microbatched=True).spec == P(None, ("data", "fsdp"), None)
    # one process feeds every row
    assert sharding.process_batch_slice(sharding.batch_sharding(mesh, rules), (16, 32)) == (0, 1)


def test_indivisible_names_the_parameter_and_the_split():
    mesh = sharding.make_mesh((2, 1, 4))
    config = GPT2Config.from_preset("tiny", vocab_pad_multiple=1)  # 50257 rows over 4 ways
    abstract, shard = _state_shardings(mesh, config)
    problems = sharding.indivisible(abstract.params, shard.params)
    assert problems == ["wte (50257, 64): dimension 50257 is split 4 ways over tensor"]
    ok_abstract, ok_shard = _state_shardings(mesh)
    assert sharding.indivisible(ok_abstract.params, ok_shard.params) == []
    # head-major c_attn: tensor parallelism splits whole heads, so it must divide n_head (4 here)
    abstract, shard = _state_shardings(sharding.make_mesh((1, 1, 8)))
    assert sharding.indivisible(abstract.params, shard.params)[:2] == [
        "h_0/attn/c_attn/bias (3, 4, 16): dimension 4 is split 8 ways over tensor",
        "h_0/attn/c_attn/kernel (64, 3, 4, 16): dimension 4 is split 8 ways over tensor"]


def _expected_shard_shapes(config: GPT2Config, fsdp: int, tensor: int) -> dict:
    """Per-device shape of every parameter, by name, written out from the intended division:
    matrices split by 'tensor' along heads / mlp / vocab and by 'fsdp' along the embedding;
    vectors over the embedding (LayerNorms, biases) and wpe's positions are not split by 'tensor'."""
    D, H, Dh, V, P_ = config.n_embd, config.n_head, config.head_dim, config.padded_vocab_size, config.n_positions
    d, t = D // fsdp, tensor
    block = {
        "ln_1/scale": (d,), "ln_1/bias": (d,), "ln_2/scale": (d,), "ln_2/bias": (d,),
        "attn/c_attn/kernel": (d, 3, H // t, Dh), "attn/c_attn/bias": (3, H // t, Dh),
        "attn/c_proj/kernel": (D // t, d), "attn/c_proj/bias": (d,),
        "mlp/c_fc/kernel": (d, 4 * D // t), "mlp/c_fc/bias": (4 * D // t,),
        "mlp/c_proj/kernel": (4 * D // t, d), "mlp/c_proj/bias": (d,),
    }  # fmt: skip
    shapes = {"wte": (V // t, d), "wpe": (P_, d), "ln_f/scale": (d,), "ln_f/bias": (d,)}
    if config.scan_layers:  # the stacked layer axis is never split
        return {**shapes, **{f"h/{k}": (config.n_layer, *s) for k, s in block.items()}}
    return {**shapes, **{f"h_{i}/{k}": s for i in range(config.n_layer) for k, s in block.items()}}


def _shard_shapes(abstract_tree, shardings) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): s.shard_shape(a.shape)
            for (path, a), s in zip(flat, jax.tree_util.tree_leaves(shardings))}  # fmt: skip


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("mesh_shape", [(1, 1, 4), (2, 2, 2)])
def test_every_parameter_and_adam_moment_is_divided_as_intended(mesh_shape, scan):
    config = GPT2Config(vocab_size=500, n_positions=32, n_embd=64, n_layer=2, n_head=4, vocab_pad_multiple=128,
                        scan_layers=scan)  # fmt: skip
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    abstract, shard = _state_shardings(sharding.make_mesh(mesh_shape, devices), config)
    expected = _expected_shard_shapes(config, fsdp=mesh_shape[1], tensor=mesh_shape[2])
    adam = abstract.opt_state[1][0], shard.opt_state[1][0]
    for name, (tree, shardings) in {"params": (abstract.params, shard.params), "mu": (adam[0].mu, adam[1].mu),
                                    "nu": (adam[0].nu, adam[1].nu)}.items():  # fmt: skip
        assert _shard_shapes(tree, shardings) == expected, name
    if mesh_shape == (1, 1, 4):  # pure tensor parallelism: every matrix but wpe is split 4 ways
        full = {jax.tree_util.keystr(path, simple=True, separator="/"): a.shape
                for path, a in jax.tree_util.tree_flatten_with_path(abstract.params)[0]}  # fmt: skip
        for key, s in _shard_shapes(abstract.params, shard.params).items():
            if len(s) >= 2 + scan and key != "wpe":
                assert np.prod(s) * 4 == np.prod(full[key]), key
