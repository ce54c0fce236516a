"""The train state and the pure step functions the trainer jits: train_step, eval_step.

A TrainState holds everything a run needs to continue exactly (step, params, optimizer state,
dropout key); the model, optimizer and schedule ride along as static fields rebuilt from the
config. Batches are dicts of int32 "inputs" / "targets": (B, T), or (grad_accum, B / grad_accum, T)
to accumulate gradients over microbatches inside one step (see split_microbatches), and
optionally float32 "weights" of the targets' shape (e.g. 0 on prompt tokens when fine-tuning).
A step's loss is the weighted mean over every target of the step, sum(w * nll) / sum(w),
whatever the microbatching: its gradient is the gradient of that one mean.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from gpt2_jax.model import GPT2, cross_entropy_sums, loss_sums
from gpt2_jax.train.optim import schedule_count


class TrainState(train_state.TrainState):
    """step, params, opt_state, dropout_key (raw uint32 key data): all arrays, all saved.
    Static: apply_fn, tx, lr_fn (the schedule, for logging the learning rate of each step)."""

    dropout_key: jax.Array
    lr_fn: Callable = struct.field(pytree_node=False, default=None)


def _create_state(model: GPT2, tx, lr_fn, params, seed: int) -> TrainState:
    dropout_key = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, lr_fn=lr_fn, dropout_key=dropout_key)


def _init_boxed(model: GPT2, tx, lr_fn, seed: int) -> TrainState:
    """State with parameters still in their LogicallyPartitioned boxes (optimizer moments
    inherit the boxes, so their logical axes are known too)."""
    init_key = jax.random.fold_in(jax.random.key(seed), 0)
    params = model.init(init_key, jnp.zeros((1, 1), jnp.int32))["params"]
    return _create_state(model, tx, lr_fn, params, seed)


def abstract_state(model: GPT2, tx, lr_fn, seed: int = 0) -> tuple[TrainState, Any]:
    """(shapes of the state, its logical PartitionSpecs), via jax.eval_shape: nothing allocated."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx, lr_fn, seed))
    shapes = jax.tree_util.tree_map(  # no sharding constraint: these are shapes, not arrays
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.LogicallyPartitioned) else x,
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return shapes, nn.get_partition_spec(boxed)


def init_state(model: GPT2, tx, lr_fn, seed: int, shardings) -> TrainState:
    """A fresh state, initialised directly into `shardings` (no full copy on any one device)."""
    fn = lambda: nn.unbox(_init_boxed(model, tx, lr_fn, seed))  # noqa: E731
    return jax.jit(fn, out_shardings=_restructure(shardings, jax.eval_shape(fn)))()


def state_from_params(model: GPT2, tx, lr_fn, params, seed: int, shardings) -> TrainState:
    """A fresh state around given host parameters (e.g. from hf.load_hf). Each process places
    only its own shards, so this works across hosts; optimizer state is created sharded."""
    placed = jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: np.asarray(x[idx], np.float32)),
        params, shardings.params,
    )
    fn = lambda p: _create_state(model, tx, lr_fn, p, seed)  # noqa: E731
    return jax.jit(fn, out_shardings=_restructure(shardings, jax.eval_shape(fn, placed)))(placed)


def _restructure(shardings, like):
    """`shardings` laid out as `like`: state trees built from other (equal but not identical)
    model / optimizer objects differ only in their static fields."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), jax.tree_util.tree_leaves(shardings))


def split_microbatches(batch: dict, grad_accum: int) -> dict:
    """Host (B, T) arrays -> (grad_accum, B / grad_accum, T): row r goes to microbatch
    r % grad_accum, so each device's contiguous block of rows holds an equal share of every
    microbatch and no data moves between devices."""
    def split(x):
        b = x.shape[0]
        if b % grad_accum:
            raise ValueError(f"{b} rows do not split into {grad_accum} microbatches")
        return np.swapaxes(x.reshape(b // grad_accum, grad_accum, *x.shape[1:]), 0, 1)

    return {k: split(np.asarray(v)) for k, v in batch.items()}


def _as_microbatches(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    inputs, targets, weights = batch["inputs"], batch["targets"], batch.get("weights")
    if inputs.ndim == 2:
        return inputs[None], targets[None], None if weights is None else weights[None]
    return inputs, targets, weights


def _loss_sums(apply_fn, params, inputs, targets, weights, **kw):
    """(sum of w x NLL, sum of w) through model.loss_sums (which honours loss_chunk) when
    apply_fn is a GPT2's apply; through its full logits otherwise."""
    model = getattr(apply_fn, "__self__", None)
    if isinstance(model, GPT2):
        return loss_sums(model, params, inputs, targets, weights, **kw)
    logits = apply_fn({"params": params}, inputs, **kw)
    return cross_entropy_sums(logits, targets, weights)


def _tied_to_microbatch(params, inputs):
    """(params, inputs), unchanged, behind an optimization barrier: the parameters become values
    of this loop iteration, so the compiler cannot hoist their FSDP all-gathers (or casts) out of
    the gradient-accumulation loop and carry whole gathered copies through it (XLA:CPU's
    loop-invariant code motion did; gathers then happen per layer, per microbatch). Only where
    the step's mesh has an fsdp axis: without gathers there is nothing to keep in the loop."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get("fsdp", 1) == 1:
        return params, inputs
    return jax.lax.optimization_barrier((params, inputs))


def _compute_copy_fn(apply_fn) -> Callable:
    """params -> params with the matmul kernels cast to the model's compute dtype under their own
    (sharded) layout, so the cast happens before any FSDP gather and the gathers move half the
    bytes. The model casts kernels at use anyway, so the values are the same, and the gradient
    of the cast is the upcast the model's own cast has; embeddings and LayerNorm parameters stay
    float32, as the model computes with them. Identity for float32 runs and non-GPT2 models."""
    model = getattr(apply_fn, "__self__", None)
    dtype = model.config.compute_dtype if isinstance(model, GPT2) else None
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
        return lambda params: params
    specs = _logical_param_specs(model.config)

    def cast(path, p, spec):
        if getattr(path[-1], "key", None) != "kernel" or p.dtype == dtype:
            return p
        return nn.with_logical_constraint(p.astype(dtype), spec)  # no-op without a mesh and rules

    return lambda params: jax.tree_util.tree_map_with_path(cast, params, specs)


@functools.lru_cache(maxsize=8)
def _logical_param_specs(config) -> Any:
    """The parameters' logical PartitionSpecs (from an abstract init: nothing allocated)."""
    boxed = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.get_partition_spec(boxed)["params"]


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer update from the gradient of the step's (weighted) mean loss over all its
    microbatches. Returns the new state and float32 metrics: loss (before the update), lr (the
    one this update applies: the schedule at the count of updates applied so far),
    grad_norm and tokens (the sum of the weights: target tokens without weights)."""
    inputs, targets, weights = _as_microbatches(batch)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    if weights is None:
        total_weight = jnp.asarray(targets.size, jnp.float32)
    else:
        weights = weights.astype(jnp.float32)
        total_weight = weights.sum()
    scale = 1.0 / jnp.maximum(total_weight, 1.0)  # all weights 0: loss and gradient 0, not NaN

    compute_copy = _compute_copy_fn(state.apply_fn)

    def loss_of(params, x, y, w, key):
        params = compute_copy(params)
        nll_sum, _ = _loss_sums(state.apply_fn, params, x, y, w, deterministic=False, rngs={"dropout": key})
        return nll_sum * scale  # this microbatch's share of the step's mean

    grad_fn = jax.value_and_grad(loss_of)

    def accumulate(carry, micro):
        loss_sum, grad_sum = carry
        i, x, y, w = micro
        params, x = _tied_to_microbatch(state.params, x)
        loss, grads = grad_fn(params, x, y, w, jax.random.fold_in(step_key, i))
        return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    n = inputs.shape[0]
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                    (jnp.arange(n), inputs, targets, weights))  # weights may be None  # fmt: skip
    metrics = {
        "loss": loss,
        "lr": jnp.asarray(state.lr_fn(schedule_count(state.opt_state, state.step)), jnp.float32),  # as applied
        "grad_norm": optax.tree.norm(grads),
        "tokens": total_weight,
    }
    return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, batch: dict) -> dict:
    """Mean next-token loss of the current parameters on a (B, T) batch, without dropout, and
    the number of tokens it covers (batch["weights"], if given, marks padding rows with 0)."""
    weights = batch.get("weights")
    nll_sum, tokens = _loss_sums(state.apply_fn, state.params, batch["inputs"], batch["targets"], weights,
                                 deterministic=True)  # fmt: skip
    return {"loss": nll_sum / jnp.maximum(tokens, 1.0), "tokens": tokens}
