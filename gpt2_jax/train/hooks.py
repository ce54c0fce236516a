"""The loop's hooks, each with one job: log a step's metrics, enforce the non-finite-step policy, save a checkpoint.

Two kinds (train/loop.py runs them):
- metric hooks, `hook(step, row)`: called for every step, in order, with that step's metrics
  read to the host (one step late, so reading never stalls the device);
- state hooks, `Periodic`: called with the train state at the steps they are due (every N steps
  and at the end), after that step's metrics went through the metric hooks. Evaluation and
  samples are a state hook too (train/evaluation.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from gpt2_jax.interop.checkpoint import Checkpoints
from gpt2_jax.train import faults, flops
from gpt2_jax.train.metrics import MetricsWriter


class Diverged(RuntimeError):
    """Too many non-finite steps: the run stops; the last good checkpoint stays as it is."""


@dataclasses.dataclass
class Periodic:
    """A state hook: `fn(step, state)` every `every` steps (0: never on a schedule), at the last
    step if `at_end`, and when the run stops early (preemption) if `at_stop`."""

    fn: Callable[[int, object], None]
    every: int = 0
    at_end: bool = True
    at_stop: bool = False

    def due(self, step: int, last: int, stopping: bool) -> bool:
        if stopping:
            return self.at_stop
        return bool(self.every and step % self.every == 0) or (self.at_end and step == last)


class Throughput:
    """Tokens/s and MFU between consecutive readings. `restart` starts a new interval (after
    compiling, after an evaluation) so time spent outside training steps is not counted."""

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
            out = {"tokens_per_sec": tps, "mfu": flops.mfu(tps, self.flops_per_token, self.peak)}
        self.step, self.time = step, now
        return out


class LogMetrics:
    """Writes a training row every `every` steps, at the last step and at the first step of this
    run (it compiled: its loss shows at once, and throughput is timed from its end)."""

    def __init__(self, writer: MetricsWriter, throughput: Throughput, *, every: int, first: int, last: int,
                 batch_size: int, block_size: int, windows_per_epoch: int, summary: dict):  # fmt: skip
        self.writer, self.throughput, self.every, self.first, self.last = writer, throughput, every, first, last
        self.batch_size, self.block_size, self.windows_per_epoch = batch_size, block_size, windows_per_epoch
        self.summary = summary

    def __call__(self, step: int, metrics: dict) -> None:
        self.writer.progress(step)
        if not (step == self.first or step % self.every == 0 or step == self.last):
            return
        row = dict(metrics)
        row["loss_tokens"] = row.pop("tokens")  # targets the step's loss counted ("tokens" is the running total)
        if not row["skipped_steps"]:
            del row["skipped_steps"]
        row.update(self.throughput.read(step))
        if step == self.first:
            self.throughput.restart(step)
        row["epoch"] = step * self.batch_size / self.windows_per_epoch if self.windows_per_epoch else 0.0
        row["tokens"] = step * self.batch_size * self.block_size
        self.writer.write(step, row, "train")
        self.summary.update(row, step=step)


class NonFinitePolicy:
    """A step whose update was non-finite (the optimizer already left it out) stops the run
    (Diverged), or is skipped with a warning while at most `max_bad_steps` have been."""

    def __init__(self, max_bad_steps: int, skipped: int, writer: MetricsWriter, ckpts: Checkpoints):
        self.max_bad_steps, self.skipped, self.writer, self.ckpts = max_bad_steps, skipped, writer, ckpts

    def __call__(self, step: int, metrics: dict) -> None:
        skipped = int(metrics["skipped_steps"])
        if skipped == self.skipped:
            return
        self.skipped = skipped
        what = f"step {step}: loss {metrics['loss']:.4g}, non-finite update (not applied)"
        if skipped <= self.max_bad_steps:
            self.writer.print(f"warning: {what}; skipped, {skipped} of max_bad_steps={self.max_bad_steps}")
            return
        self.ckpts.wait()
        saved = self.ckpts.steps()
        where = f"the last good checkpoint, {self.ckpts.path(saved[-1])}, is kept" if saved else "no checkpoint was saved"
        raise Diverged(f"{what}; stopping: {where}. Lower lr, raise warmup_steps, or set max_bad_steps=N to "
                       "skip up to N such steps")  # fmt: skip


class SaveCheckpoint:
    """Starts an asynchronous save of the state after `step`, with the data position (the next
    batch) and the config; training goes on while it is written."""

    def __init__(self, ckpts: Checkpoints, train_it, config: dict, model):
        self.ckpts, self.train_it, self.config, self.model = ckpts, train_it, config, model

    def __call__(self, step: int, state) -> None:
        self.ckpts.save(step, state, self.train_it.get_state(), self.config, self.model, force=True)
        faults.while_saving(step)
        if faults.active():
            self.ckpts.wait()  # injected faults expect the checkpoint of their step on disk
