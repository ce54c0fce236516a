"""The Trainer: one run's compiled train / eval steps, shardings, initial or resumed state, and data iterators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gpt2_jax.data import loader as data_lib
from gpt2_jax.interop import hf
from gpt2_jax.interop.checkpoint import Checkpoints, abstract_with_shardings
from gpt2_jax.interop.load import load_workdir
from gpt2_jax.model import GPT2, count_params, to_layout
from gpt2_jax.parallel import sharding
from gpt2_jax.train import faults, flops, optim, steps
from gpt2_jax.train.plan import COMPUTE_FIELDS, ConfigError, Plan

# Shape fields a checkpoint must share with the config to resume from it.
SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "vocab_pad_multiple")


def _optimizer(c: ml_collections.ConfigDict, p: Plan):
    """The optimizer, wrapped so that a step with a non-finite update leaves the parameters and
    optimizer moments untouched (the trainer then stops, or skips up to max_bad_steps of them).
    The schedule uses the plan's warmup (clamped to total_steps), not c.warmup_steps."""
    lr_fn = optim.lr_schedule(c.lr, p.total_steps, p.warmup_steps, c.min_lr_ratio)
    tx = optim.make_optimizer(lr_fn, weight_decay=c.weight_decay, b1=c.beta1, b2=c.beta2, eps=c.adam_eps,
                              grad_clip=c.grad_clip)  # fmt: skip
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)
    if faults.nan_steps():
        tx = optax.chain(_poison_gradients(faults.nan_steps()), tx)
    return tx, lr_fn


def _poison_gradients(bad_steps) -> optax.GradientTransformation:
    """NaN gradients at `bad_steps` (1-based, as logged): fault injection for tests."""
    bad = jnp.asarray(sorted(s - 1 for s in bad_steps))

    def update(grads, count, params=None):
        factor = jnp.where(jnp.any(count == bad), jnp.nan, 1.0)
        return jax.tree_util.tree_map(lambda g: g * factor, grads), count + 1

    return optax.GradientTransformation(lambda params: jnp.zeros([], jnp.int32), update)


def skipped_updates(opt_state) -> jax.Array:
    """How many non-finite updates the optimizer has left out so far."""
    return (opt_state if isinstance(opt_state, optax.ApplyIfFiniteState) else opt_state[1]).total_notfinite


def _train_step(state: steps.TrainState, batch: dict):
    """steps.train_step, also returning how many updates were skipped as non-finite so far."""
    state, out = steps.train_step(state, batch)
    return state, {**out, "skipped_steps": skipped_updates(state.opt_state)}


def to_host(tree):
    """Replicated device values -> numpy, reading only this process's copy (works multi-host)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


class Trainer:
    """One run's compiled functions and state: the jitted, donated train step and the eval step
    with their shardings, the state (fresh, from HF weights or another workdir, or resumed), and
    this process's data iterators. The loop around them is train/loop.py. Build and use it
    inside sharding.use_mesh(plan.mesh, plan.rules), so the model's constraints resolve."""

    def __init__(self, c: ml_collections.ConfigDict, p: Plan):
        self.c, self.p = c, p
        self.model = GPT2(p.model)
        self.tx, self.lr_fn = _optimizer(c, p)
        abstract, specs = steps.abstract_state(self.model, self.tx, self.lr_fn, c.seed)
        self.state_sharding = sharding.logical_to_shardings(specs, p.mesh, p.rules)
        self.abstract_state = abstract_with_shardings(abstract, self.state_sharding)
        self.train_batch_sharding = sharding.batch_sharding(p.mesh, p.rules, microbatched=True)
        self.eval_batch_sharding = sharding.batch_sharding(p.mesh, p.rules)
        replicated = sharding.replicated(p.mesh)
        self.train_fn = jax.jit(_train_step, in_shardings=(self.state_sharding, self.train_batch_sharding),
                                out_shardings=(self.state_sharding, replicated), donate_argnums=0)  # fmt: skip
        self.eval_fn = jax.jit(steps.eval_step, in_shardings=(self.state_sharding, self.eval_batch_sharding),
                               out_shardings=replicated)  # fmt: skip
        self.peak = flops.total_peak_flops(p.mesh.devices.flat, p.model.dtype, c.peak_flops)
        self.skipped = 0  # non-finite updates left out so far (restored with the optimizer state)

    def initial_state(self) -> steps.TrainState:
        """A fresh state, created directly into its shardings: random, HF weights or another
        workdir's parameters (init_from)."""
        p, c = self.p, self.c
        if p.hf_path is None and p.init_workdir is None:
            return steps.init_state(self.model, self.tx, self.lr_fn, c.seed, self.state_sharding)
        if p.hf_path is not None:
            _, params = hf.load_hf(p.hf_path, **{f: getattr(p.model, f) for f in COMPUTE_FIELDS})
        else:
            params = to_layout(_workdir_params(p.init_workdir, self.abstract_state.params["wte"].shape[0], p.mesh), p.model)
        return steps.state_from_params(self.model, self.tx, self.lr_fn, params, c.seed, self.state_sharding)

    def resume(self, ckpts: Checkpoints, train_it: data_lib.BatchIterator) -> tuple[steps.TrainState, str] | None:
        """(state, what was resumed) from the newest usable checkpoint, restored onto this mesh,
        with `train_it` moved to the batch that comes next; None when there are no checkpoints."""
        if ckpts.steps():
            self._check_same_model(ckpts)
        restored = ckpts.restore_latest(self.abstract_state)  # process 0 names the step for all
        if restored is None:
            return None
        train_it.set_state(restored.data_state)
        self.skipped = int(to_host(skipped_updates(restored.state.opt_state)))
        changed = _changed_keys(restored.config, self.c.to_dict())
        note = "".join(f"warning: {s}\n" for s in ckpts.skipped) + f"resuming from {ckpts.path(restored.step)}"
        note += f" (init_from {self.c.init_from!r} is not used)" if self.c.init_from != "scratch" else ""
        note += f"; config changed since: {changed}" if changed else ""
        return restored.state, note

    def _check_same_model(self, ckpts: Checkpoints) -> None:
        step = ckpts.steps()[-1]
        try:
            saved = ckpts.model_config(step)
        except Exception:  # unreadable: restore_latest skips it and says why
            return
        if saved.scan_layers != self.p.model.scan_layers:  # the parameter trees differ: h vs h_0 ... h_{L-1}
            layout = "scanned (stacked)" if saved.scan_layers else "unrolled"
            raise ConfigError(f"{ckpts.directory} holds checkpoints with {layout} layers (model.scan_layers="
                              f"{saved.scan_layers}); resume with --config.model.scan_layers={saved.scan_layers}, "
                              "or use another --workdir")  # fmt: skip
        diff = [f"{f} {getattr(saved, f)} (checkpoint) vs {getattr(self.p.model, f)} (config)"
                for f in SHAPE_FIELDS if getattr(saved, f) != getattr(self.p.model, f)]  # fmt: skip
        if diff:
            raise ConfigError(f"{ckpts.directory} holds checkpoints of another model: {'; '.join(diff)}. "
                              "Use another --workdir, or the model settings it was trained with")  # fmt: skip

    def train_iterator(self) -> data_lib.BatchIterator:
        """This process's share of every global batch (the rows its devices hold)."""
        p, c = self.p, self.c
        shape = (p.grad_accum, c.batch_size // p.grad_accum, p.block_size)
        index, count = sharding.process_batch_slice(self.train_batch_sharding, shape, batch_dim=1)
        return data_lib.make_train_iterator(p.data_path, block_size=p.block_size, global_batch_size=c.batch_size,
                                            seed=c.seed, process_index=index, process_count=count,
                                            vocab_size=p.model.vocab_size)  # fmt: skip

    def describe(self, state) -> str:
        p, c = self.p, self.c
        epochs = p.total_steps * c.batch_size / p.windows_per_epoch
        peak = f"{self.peak / 1e12:.3g} TFLOP/s peak" if self.peak else "peak FLOP/s unknown (no MFU; set peak_flops)"
        return (
            f"model: {p.model.n_layer} layers, n_embd {p.model.n_embd}, {p.model.n_head} heads, "
            f"{count_params(state.params) / 1e6:.2f}M parameters, block {p.block_size}, {p.model.dtype}"
            f"{f', weights from {p.hf_path}' if p.hf_path else ''}\n"
            f"train: {p.total_steps:,} steps x {c.batch_size} sequences = {c.batch_size * p.block_size:,} "
            f"tokens/step (grad_accum {p.grad_accum}), {epochs:.2f} epochs of {p.windows_per_epoch:,} windows "
            f"in {p.data_path}\n{sharding.device_summary(p.mesh)}, {peak}"
        )


def _workdir_params(workdir: str, vocab_rows: int, mesh) -> dict:
    """Host parameters of a training workdir's newest usable checkpoint (read whole by every
    process), with wte padded or trimmed to `vocab_rows` (the plan took the model's shape from
    that checkpoint; only the vocabulary padding may differ: padding rows are never predicted,
    so zeros do)."""
    params = to_host(load_workdir(workdir, placement=sharding.replicated(mesh)).params)
    wte = params["wte"][:vocab_rows]
    params["wte"] = np.concatenate([wte, np.zeros((vocab_rows - len(wte), wte.shape[1]), wte.dtype)])
    return params


def _changed_keys(saved: dict, current: dict, prefix: str = "") -> str:
    """'key old -> new' for config keys that differ between a checkpoint and this run."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _changed_keys(a, b, f"{prefix}{k}.")
            out += [inner] if inner else []
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and tuple(a) == b):
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return ", ".join(out)
