"""The training loop of one run: compiled steps, shardings, data, evaluation and samples."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gpt2_jax.data import loader as data_lib
from gpt2_jax.infer.sampling import Sampler, SamplingConfig
from gpt2_jax.interop import hf
from gpt2_jax.interop.checkpoint import Checkpoints, abstract_with_shardings
from gpt2_jax.interop.load import load_workdir
from gpt2_jax.interop.tokenizer import get_tokenizer
from gpt2_jax.model import GPT2, count_params
from gpt2_jax.parallel import sharding
from gpt2_jax.train import faults, metrics, optim, steps
from gpt2_jax.train.plan import COMPUTE_FIELDS, ConfigError, Plan
from gpt2_jax.train.preemption import Preempted, StopRequest

# Shape fields a checkpoint must share with the config to resume from it.
SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "vocab_pad_multiple")


class Diverged(RuntimeError):
    """Too many non-finite steps: the run stops; the last good checkpoint stays as it is."""


def _optimizer(c: ml_collections.ConfigDict, total_steps: int):
    """The optimizer, wrapped so that a step with a non-finite update leaves the parameters and
    optimizer moments untouched (the trainer then stops, or skips up to max_bad_steps of them)."""
    lr_fn = optim.lr_schedule(c.lr, total_steps, c.warmup_steps, c.min_lr_ratio)
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


class _Throughput:
    """Tokens/s and MFU between consecutive readings, excluding time spent in evaluation."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.step, self.time = None, None

    def restart(self, step: int) -> None:
        self.step, self.time = step, time.perf_counter()

    def read(self, step: int) -> dict:
        now = time.perf_counter()
        out = {}
        if self.step is not None and step > self.step:
            tps = (step - self.step) * self.tokens_per_step / (now - self.time)
            out = {"tokens_per_sec": tps, "mfu": metrics.mfu(tps, self.flops_per_token, self.peak)}
        self.step, self.time = step, now
        return out


class Trainer:
    """One run: its compiled step functions, shardings, data and sampler. Build and use it
    inside sharding.use_mesh(plan.mesh, plan.rules), so the model's constraints resolve."""

    def __init__(self, c: ml_collections.ConfigDict, p: Plan):
        self.c, self.p = c, p
        self.model = GPT2(p.model)
        self.tx, self.lr_fn = _optimizer(c, p.total_steps)
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
        self.peak = metrics.total_peak_flops(p.mesh.devices.flat, p.model.dtype, c.peak_flops)
        self.throughput = _Throughput(c.batch_size * p.block_size, metrics.flops_per_token(p.model, p.block_size), self.peak)
        self.sampler = None
        if p.prompt and jax.process_count() == 1:  # TODO(multi-host): gather sampled tokens across processes
            self.sampler = Sampler(p.model, None, SamplingConfig(c.sample.temperature, c.sample.top_k))
        self.rouge_rows = []  # held-out prompt/completion rows scored at each evaluation (single process)
        if c.rouge.path and jax.process_count() == 1:
            from gpt2_jax.infer.rouge import read_pairs

            self.rouge_rows = read_pairs(c.rouge.path)[: c.rouge.examples]
        self.summary: dict = {}
        self.skipped = 0  # non-finite updates seen so far (restored with the optimizer state)

    def initial_state(self) -> steps.TrainState:
        """A fresh state, created directly into its shardings: random, HF weights or another
        workdir's parameters (init_from)."""
        p, c = self.p, self.c
        if p.hf_path is None and p.init_workdir is None:
            return steps.init_state(self.model, self.tx, self.lr_fn, c.seed, self.state_sharding)
        if p.hf_path is not None:
            _, params = hf.load_hf(p.hf_path, **{f: getattr(p.model, f) for f in COMPUTE_FIELDS})
        else:
            params = _workdir_params(p.init_workdir, self.abstract_state.params["wte"].shape[0], p.mesh)
        return steps.state_from_params(self.model, self.tx, self.lr_fn, params, c.seed, self.state_sharding)

    def resume(self, ckpts: Checkpoints, train_it: data_lib.BatchIterator) -> tuple[steps.TrainState, str] | None:
        """(state, what was resumed) from the newest usable checkpoint, restored onto this mesh,
        with `train_it` moved to the batch that comes next; None when there are no checkpoints."""
        if not ckpts.steps():
            return None
        self._check_same_model(ckpts)
        restored = ckpts.restore_latest(self.abstract_state)
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
        diff = [f"{f} {getattr(saved, f)} (checkpoint) vs {getattr(self.p.model, f)} (config)"
                for f in SHAPE_FIELDS if getattr(saved, f) != getattr(self.p.model, f)]  # fmt: skip
        if diff:
            raise ConfigError(f"{ckpts.directory} holds checkpoints of another model: {'; '.join(diff)}. "
                              "Use another --workdir, or the model settings it was trained with")  # fmt: skip

    def train_iterator(self) -> data_lib.BatchIterator:
        """This process's share of every global batch (the rows its devices hold)."""
        p, c = self.p, self.c
        shape = (c.grad_accum, c.batch_size // c.grad_accum, p.block_size)
        index, count = sharding.process_batch_slice(self.train_batch_sharding, shape, batch_dim=1)
        return data_lib.make_train_iterator(p.data_path, block_size=p.block_size, global_batch_size=c.batch_size,
                                            seed=c.seed, process_index=index, process_count=count,
                                            vocab_size=p.model.vocab_size)  # fmt: skip

    def run(self, state: steps.TrainState, train_it, writer: metrics.MetricsWriter, ckpts: Checkpoints,
            stop: StopRequest) -> steps.TrainState:  # fmt: skip
        """Train from state.step to total_steps, saving every checkpoint_every steps and at the end.
        A step's metrics are read after the next step is queued, so reading them never stalls the
        device; that is also when a non-finite step is noticed, always before a checkpoint."""
        c, p = self.c, self.p
        start = int(to_host(state.step))
        pending = unchecked = None
        for step in range(start + 1, p.total_steps + 1):  # `step` updates are done after this one
            batch = data_lib.to_global_batch(steps.split_microbatches(next(train_it), c.grad_accum),
                                             self.train_batch_sharding)  # fmt: skip
            state, step_metrics = self.train_fn(state, batch)
            if pending is not None:
                self._log(writer, *pending)
                pending = None
            if unchecked is not None:
                self._check_finite(ckpts, *unchecked, writer)
            unchecked = (step, step_metrics)
            if step == start + 1:  # it compiled: show its loss now, time from its end
                self._log(writer, step, step_metrics)
                self.throughput.restart(step)
            elif step % c.log_every == 0 or step == p.total_steps:
                pending = (step, step_metrics)
            writer.progress(step)
            signum = stop.agreed(sync=step % c.log_every == 0)
            if signum or (c.checkpoint_every and step % c.checkpoint_every == 0) or step == p.total_steps:
                self._check_finite(ckpts, *unchecked, writer)  # never save a state after a bad update
                unchecked = None
                self._save(ckpts, step, state, train_it)
            faults.after_step(step)
            if signum:
                if pending is not None:
                    self._log(writer, *pending)
                ckpts.wait()
                raise Preempted(signum, step, ckpts.path(step))
            if c.eval_every and (step % c.eval_every == 0 or step == p.total_steps):
                if pending is not None:
                    self._log(writer, *pending)
                    pending = None
                self._evaluate(writer, step, state)
                self.throughput.restart(step)
        if unchecked is not None:
            self._check_finite(ckpts, *unchecked, writer)
        if pending is not None:
            self._log(writer, *pending)
        return state

    def _save(self, ckpts: Checkpoints, step: int, state, train_it) -> None:
        """Start an asynchronous save of `state` after `step`, with the data position (the next
        batch) and the config; training goes on while it is written."""
        ckpts.save(step, state, train_it.get_state(), self.c.to_dict(), self.p.model, force=True)
        faults.while_saving(step)
        if faults.active():
            ckpts.wait()  # injected faults expect the checkpoint of their step on disk

    def _check_finite(self, ckpts: Checkpoints, step: int, device_metrics: dict, writer) -> None:
        """Stop (Diverged) at a step whose update was non-finite, or skip it while at most
        max_bad_steps have been; the optimizer already left such an update out."""
        skipped = int(to_host(device_metrics["skipped_steps"]))
        if skipped == self.skipped:
            return
        self.skipped = skipped
        loss = float(to_host(device_metrics["loss"]))
        what = f"step {step}: loss {loss:.4g}, non-finite update (not applied)"
        if skipped <= self.c.max_bad_steps:
            writer.print(f"warning: {what}; skipped, {skipped} of max_bad_steps={self.c.max_bad_steps}")
            return
        ckpts.wait()
        saved = ckpts.steps()
        where = f"the last good checkpoint, {ckpts.path(saved[-1])}, is kept" if saved else "no checkpoint was saved"
        raise Diverged(f"{what}; stopping: {where}. Lower lr, raise warmup_steps, or set max_bad_steps=N to "
                       "skip up to N such steps")  # fmt: skip

    def _log(self, writer, step: int, device_metrics: dict) -> None:
        c, p = self.c, self.p
        row = {k: float(v) for k, v in to_host(device_metrics).items()}
        row["loss_tokens"] = row.pop("tokens")  # targets the step's loss counted ("tokens" is the running total)
        if not row["skipped_steps"]:
            del row["skipped_steps"]
        row.update(self.throughput.read(step))
        row["epoch"] = step * c.batch_size / p.windows_per_epoch if p.windows_per_epoch else 0.0
        row["tokens"] = step * c.batch_size * p.block_size
        writer.write(step, row, "train")
        self.summary.update(row, step=step)

    def _evaluate(self, writer, step: int, state) -> None:
        row = self.validation_loss(state)
        message = f"step {step}: val_loss {row['val_loss']:.4f}, val_ppl {row['val_ppl']:.2f}"
        if self.rouge_rows:
            row.update(self.rouge(state))
            message += ", " + ", ".join(f"{k} {row[k]:.3f}" for k in ("rouge1", "rouge2", "rougeL"))
        if self.sampler is not None:
            row["sample"] = self.sample(state)
            writer.text(step, "sample", row["sample"])
            message += "\n--- sample ---\n" + row["sample"] + "\n--------------"
        writer.write(step, row, "eval")
        writer.print(message)
        self.summary.update(row)

    def validation_loss(self, state) -> dict:
        """Loss over the first eval_batches batches of the val split (all of it if <= 0)."""
        p, c = self.p, self.c
        index, count = sharding.process_batch_slice(self.eval_batch_sharding, (p.eval_batch_size, p.block_size))
        it = data_lib.make_eval_iterator(p.data_path, block_size=p.block_size, global_batch_size=p.eval_batch_size,
                                         process_index=index, process_count=count, vocab_size=p.model.vocab_size)  # fmt: skip
        n = it.num_batches if c.eval_batches <= 0 else min(c.eval_batches, it.num_batches)
        results = [self.eval_fn(state, data_lib.to_global_batch(next(it), self.eval_batch_sharding)) for _ in range(n)]
        results = to_host(results)
        tokens = sum(float(r["tokens"]) for r in results)
        loss = sum(float(r["loss"]) * float(r["tokens"]) for r in results) / max(tokens, 1.0)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(tokens)}

    def rouge(self, state) -> dict:
        """ROUGE-1/2/L F of greedy completions of the held-out prompts (rouge.path)."""
        import flax.linen as nn

        from gpt2_jax.infer.rouge import rouge_eval

        with nn.logical_axis_rules(()):
            scores, _ = rouge_eval(self.p.model, state.params, self.rouge_rows, self.c.rouge.max_new_tokens)
        return {**{k: scores[k] for k in ("rouge1", "rouge2", "rougeL")}, "rouge_mean_len": scores["mean_len"]}

    def sample(self, state) -> str:
        """The fixed prompt continued by the current parameters, with the same random key every
        time, so successive samples differ only by what training changed."""
        import flax.linen as nn

        self.sampler.params = state.params
        with nn.logical_axis_rules(()):  # one sequence: nothing to split over the batch axes
            rows = self.sampler.generate(np.array([self.p.prompt]), self.c.sample.length, jax.random.key(self.c.seed),
                                         stop_at_eot=False)  # fmt: skip
        return get_tokenizer().decode(list(self.p.prompt[1:]) + rows[0])

    def describe(self, state) -> str:
        p, c = self.p, self.c
        epochs = p.total_steps * c.batch_size / p.windows_per_epoch
        peak = f"{self.peak / 1e12:.3g} TFLOP/s peak" if self.peak else "peak FLOP/s unknown (no MFU; set peak_flops)"
        return (
            f"model: {p.model.n_layer} layers, n_embd {p.model.n_embd}, {p.model.n_head} heads, "
            f"{count_params(state.params) / 1e6:.2f}M parameters, block {p.block_size}, {p.model.dtype}"
            f"{f', weights from {p.hf_path}' if p.hf_path else ''}\n"
            f"train: {p.total_steps:,} steps x {c.batch_size} sequences = {c.batch_size * p.block_size:,} "
            f"tokens/step (grad_accum {c.grad_accum}), {epochs:.2f} epochs of {p.windows_per_epoch:,} windows "
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
