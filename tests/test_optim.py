"""Optimizer: the schedule's shape, the decay mask, and one-to-one agreement with torch's AdamW + clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gpt2_jax.model import GPT2Config, abstract_params
from gpt2_jax.train import optim


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    lr = optim.lr_schedule(1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    values = np.array([float(lr(s)) for s in range(0, 121)])
    np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10, rtol=1e-6)  # step 0 already learns
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55, rel=1e-5)  # halfway: (peak + floor) / 2
    assert values[110] == pytest.approx(0.1, rel=1e-5)
    assert values[120] == pytest.approx(0.1, rel=1e-5)  # stays at the floor past total_steps
    assert np.all(np.diff(values[10:111]) <= 1e-7)


def test_schedule_without_warmup_starts_at_the_peak():
    lr = optim.lr_schedule(3e-4, total_steps=5, warmup_steps=0, min_lr_ratio=0.0)
    assert float(lr(0)) == pytest.approx(3e-4)
    assert float(lr(5)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=5, warmup_steps=6), "warmup_steps"),
    (dict(total_steps=5, warmup_steps=1, min_lr_ratio=1.5), "min_lr_ratio"),
])
def test_schedule_refuses_impossible_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.lr_schedule(1e-3, **kwargs)


def test_weight_decay_applies_to_matrices_only():
    mask = optim.decay_mask(abstract_params(GPT2Config.from_preset("tiny")))
    assert mask["wte"] and mask["wpe"]
    assert mask["h_0"]["attn"]["c_attn"]["kernel"] and mask["h_1"]["mlp"]["c_proj"]["kernel"]
    assert not mask["h_0"]["attn"]["c_attn"]["bias"]
    assert not mask["h_0"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]


def test_clipping_off_keeps_the_same_state_structure():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    on = optim.make_optimizer(lambda s: 1e-3, grad_clip=1.0).init(params)
    off = optim.make_optimizer(lambda s: 1e-3, grad_clip=0.0).init(params)
    assert jax.tree_util.tree_structure(on) == jax.tree_util.tree_structure(off)


def test_matches_torch_adamw_with_clipping_and_decay_groups():
    """Same gradients into both optimizers for 6 steps: clip_grad_norm_ + AdamW with decay on
    the matrix only, LambdaLR with our schedule; parameters agree to float32 precision."""
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)) * s, rng.normal(size=3) * s) for s in (0.1, 3, 0.5, 10, 1, 0.01)]
    peak, total, warmup = 0.05, 6, 2
    lr = optim.lr_schedule(peak, total, warmup, 0.1)

    tx = optim.make_optimizer(lr, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0)
    params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
    state = tx.init(params)
    for gw, gb in grads:
        updates, state = tx.update({"w": jnp.asarray(gw, jnp.float32), "b": jnp.asarray(gb, jnp.float32)}, state, params)
        params = jax.tree_util.tree_map(jnp.add, params, updates)

    w, b = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lr(s)) / peak)
    for gw, gb in grads:
        w.grad, b.grad = torch.tensor(gw, dtype=torch.float32), torch.tensor(gb, dtype=torch.float32)
        torch.nn.utils.clip_grad_norm_([w, b], 1.0)
        opt.step()
        sched.step()

    np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["b"]), b.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(params["w"]), w0)  # it moved
