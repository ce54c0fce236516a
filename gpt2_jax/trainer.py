"""The training loop of one run: compiled steps, shardings, data, evaluation and samples."""

from __future__ import annotations

import math
import time

import jax
import ml_collections
import numpy as np

from gpt2_jax import data as data_lib
from gpt2_jax import hf, metrics, optim, sharding, steps
from gpt2_jax.model import GPT2, count_params
from gpt2_jax.plan import COMPUTE_FIELDS, Plan
from gpt2_jax.sampling import Sampler, SamplingConfig
from gpt2_jax.tokenizer import get_tokenizer

def _optimizer(c: ml_collections.ConfigDict, total_steps: int):
    lr_fn = optim.lr_schedule(c.lr, total_steps, c.warmup_steps, c.min_lr_ratio)
    tx = optim.make_optimizer(lr_fn, weight_decay=c.weight_decay, b1=c.beta1, b2=c.beta2, eps=c.adam_eps,
                              grad_clip=c.grad_clip)  # fmt: skip
    return tx, lr_fn


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
        _, specs = steps.abstract_state(self.model, self.tx, self.lr_fn, c.seed)
        self.state_sharding = sharding.logical_to_shardings(specs, p.mesh, p.rules)
        self.train_batch_sharding = sharding.batch_sharding(p.mesh, p.rules, microbatched=True)
        self.eval_batch_sharding = sharding.batch_sharding(p.mesh, p.rules)
        replicated = sharding.replicated(p.mesh)
        self.train_fn = jax.jit(steps.train_step, in_shardings=(self.state_sharding, self.train_batch_sharding),
                                out_shardings=(self.state_sharding, replicated), donate_argnums=0)  # fmt: skip
        self.eval_fn = jax.jit(steps.eval_step, in_shardings=(self.state_sharding, self.eval_batch_sharding),
                               out_shardings=replicated)  # fmt: skip
        self.peak = metrics.total_peak_flops(p.mesh.devices.flat, p.model.dtype, c.peak_flops)
        self.throughput = _Throughput(c.batch_size * p.block_size, metrics.flops_per_token(p.model, p.block_size), self.peak)
        self.sampler = None
        if p.prompt and jax.process_count() == 1:  # TODO(multi-host): gather sampled tokens across processes
            self.sampler = Sampler(p.model, None, SamplingConfig(c.sample.temperature, c.sample.top_k))
        self.summary: dict = {}

    def initial_state(self) -> steps.TrainState:
        """A fresh state, created directly into its shardings: HF weights (init_from) or random."""
        p, c = self.p, self.c
        if p.hf_path is None:
            return steps.init_state(self.model, self.tx, self.lr_fn, c.seed, self.state_sharding)
        _, params = hf.load_hf(p.hf_path, **{f: getattr(p.model, f) for f in COMPUTE_FIELDS})
        return steps.state_from_params(self.model, self.tx, self.lr_fn, params, c.seed, self.state_sharding)

    def train_iterator(self) -> data_lib.BatchIterator:
        """This process's share of every global batch (the rows its devices hold)."""
        p, c = self.p, self.c
        shape = (c.grad_accum, c.batch_size // c.grad_accum, p.block_size)
        index, count = sharding.process_batch_slice(self.train_batch_sharding, shape, batch_dim=1)
        return data_lib.make_train_iterator(p.data_path, block_size=p.block_size, global_batch_size=c.batch_size,
                                            seed=c.seed, process_index=index, process_count=count,
                                            vocab_size=p.model.vocab_size)  # fmt: skip

    def run(self, state: steps.TrainState, train_it, writer: metrics.MetricsWriter) -> steps.TrainState:
        """Train from state.step to total_steps. Metrics of a logged step are read after the next
        step is queued, so reading them never stalls the device."""
        c, p = self.c, self.p
        start = int(to_host(state.step))
        pending = None
        for step in range(start + 1, p.total_steps + 1):  # `step` updates are done after this one
            batch = data_lib.to_global_batch(steps.split_microbatches(next(train_it), c.grad_accum),
                                             self.train_batch_sharding)  # fmt: skip
            state, step_metrics = self.train_fn(state, batch)
            if pending is not None:
                self._log(writer, *pending)
                pending = None
            if step == start + 1:  # it compiled: show its loss now, time from its end
                self._log(writer, step, step_metrics)
                self.throughput.restart(step)
            elif step % c.log_every == 0 or step == p.total_steps:
                pending = (step, step_metrics)
            writer.progress(step)
            if c.eval_every and (step % c.eval_every == 0 or step == p.total_steps):
                if pending is not None:
                    self._log(writer, *pending)
                    pending = None
                self._evaluate(writer, step, state)
                self.throughput.restart(step)
        if pending is not None:
            self._log(writer, *pending)
        return state

    def _log(self, writer, step: int, device_metrics: dict) -> None:
        c, p = self.c, self.p
        row = {k: float(v) for k, v in to_host(device_metrics).items()}
        row.update(self.throughput.read(step))
        row["epoch"] = step * c.batch_size / p.windows_per_epoch
        row["tokens"] = step * c.batch_size * p.block_size
        writer.write(step, row, "train")
        self.summary.update(row, step=step)

    def _evaluate(self, writer, step: int, state) -> None:
        row = self.validation_loss(state)
        message = f"step {step}: val_loss {row['val_loss']:.4f}, val_ppl {row['val_ppl']:.2f}"
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


