"""train_step / eval_step: the weighted mean over a whole step, microbatching, the chunked loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax.model import GPT2, GPT2Config, init_params, loss_fn
from gpt2_jax.train import steps

VOCAB = 256


def _config(**kw):
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4, **kw)


# An "optimizer" that keeps the step's gradient as its state (and leaves the parameters alone),
# so tests read exactly the gradient train_step computed.
_RECORD_GRADS = optax.GradientTransformation(
    init=lambda params: jax.tree_util.tree_map(jnp.zeros_like, params),
    update=lambda grads, state, params=None: (jax.tree_util.tree_map(jnp.zeros_like, grads), grads),
)


def _state(config):
    params = init_params(config, jax.random.key(0))
    params = dict(params, wte=params["wte"] * 30)  # confident logits: per-token losses differ widely
    return steps.TrainState.create(apply_fn=GPT2(config).apply, params=params,
                                   tx=_RECORD_GRADS, lr_fn=lambda s: 1.0,
                                   dropout_key=jax.random.key_data(jax.random.key(1)))  # fmt: skip


def _grads(old, new):
    return new.opt_state


def _batch(seed=0, rows=8, length=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(rows, length + 1))
    weights = (rng.random((rows, length)) < 0.5).astype(np.float32)
    weights[::2] *= 0.25  # microbatch 0 (even rows, see split_microbatches) weighs far less
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32), "weights": weights}


def _step(state, batch, grad_accum):
    if grad_accum > 1:
        batch = steps.split_microbatches(batch, grad_accum)
    return jax.jit(steps.train_step)(state, batch)


def _reference(config, state, batch):
    """The global weighted mean over the whole batch at once, and its gradient."""
    f = lambda p: loss_fn(GPT2(config), p, batch["inputs"], batch["targets"], batch["weights"])  # noqa: E731
    return jax.value_and_grad(f)(state.params)


def _assert_trees_close(a, b, rtol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, atol=rtol * np.abs(y).max())


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("loss_chunk", [0, 6])
def test_weighted_step_is_the_weighted_mean_over_the_whole_step(grad_accum, loss_chunk):
    config = _config(loss_chunk=loss_chunk)
    state, batch = _state(config), _batch()
    ref_loss, ref_grads = _reference(config, state, batch)
    new, m = _step(state, batch, grad_accum)
    assert float(m["loss"]) == pytest.approx(float(ref_loss), rel=1e-5)
    assert float(m["tokens"]) == batch["weights"].sum()
    assert float(m["grad_norm"]) == pytest.approx(float(optax.tree.norm(ref_grads)), rel=1e-5)
    _assert_trees_close(_grads(state, new), ref_grads, 1e-5)
    if grad_accum > 1:  # the mean of per-microbatch means would be a different number
        micro = steps.split_microbatches(batch, grad_accum)
        means = [float(loss_fn(GPT2(config), state.params, micro["inputs"][i], micro["targets"][i], micro["weights"][i]))
                 for i in range(grad_accum)]  # fmt: skip
        assert abs(np.mean(means) - float(ref_loss)) > 1e-2


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_targets_of_weight_zero_change_nothing(grad_accum):
    config = _config()
    state, batch = _state(config), _batch()
    changed = {k: v.copy() for k, v in batch.items()}
    masked = batch["weights"] == 0
    changed["targets"][masked] = (batch["targets"][masked] + 1) % VOCAB
    a, ma = _step(state, batch, grad_accum)
    b, mb = _step(state, changed, grad_accum)
    assert float(ma["loss"]) == float(mb["loss"])
    _assert_trees_close(_grads(state, a), _grads(state, b), 0.0)
    changed["targets"][~masked] = (batch["targets"][~masked] + 1) % VOCAB  # a weighted one does
    _, mc = _step(state, changed, grad_accum)
    assert float(mc["loss"]) != float(ma["loss"])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_without_weights_the_step_is_the_plain_mean(grad_accum):
    config = _config()
    state, batch = _state(config), _batch()
    del batch["weights"]
    f = lambda p: loss_fn(GPT2(config), p, batch["inputs"], batch["targets"])  # noqa: E731
    ref_loss, ref_grads = jax.value_and_grad(f)(state.params)
    new, m = _step(state, batch, grad_accum)
    assert float(m["loss"]) == pytest.approx(float(ref_loss), rel=1e-6)
    assert float(m["tokens"]) == batch["targets"].size
    _assert_trees_close(_grads(state, new), ref_grads, 1e-5)


def test_all_weights_zero_gives_zero_loss_not_nan():
    config = _config()
    state, batch = _state(config), _batch()
    batch["weights"][:] = 0.0
    _, m = _step(state, batch, 2)
    assert float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0 and float(m["tokens"]) == 0.0


@pytest.mark.parametrize("weighted", [False, True])
def test_eval_step_chunked_equals_plain(weighted):
    batch = _batch()
    if not weighted:
        del batch["weights"]
    plain, chunked = _state(_config()), _state(_config(loss_chunk=5))
    a, b = jax.jit(steps.eval_step)(plain, batch), jax.jit(steps.eval_step)(chunked, batch)
    assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-6)
    assert float(a["tokens"]) == float(b["tokens"]) == (batch["weights"].sum() if weighted else batch["targets"].size)
