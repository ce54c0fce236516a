"""The training loop: train_and_evaluate(config, workdir) wires a run's hooks; `loop` runs the steps and calls them.

    for each step: dispatch the jitted train step; read the previous step's metrics (the device
    is busy with this one meanwhile) through the metric hooks; if a state hook is due (checkpoint,
    evaluation) or a stop was requested, read this step's metrics now and run those hooks.

A step's metrics always go through the non-finite policy before any state hook sees the state
after it, so a checkpoint never holds a state after a step that should have stopped the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
from typing import Callable, Iterator

import jax
import ml_collections

from gpt2_jax.data.loader import to_global_batch
from gpt2_jax.interop.checkpoint import Checkpoints
from gpt2_jax.parallel import sharding
from gpt2_jax.train import faults, flops
from gpt2_jax.train.evaluation import Evaluate, evaluators
from gpt2_jax.train.hooks import (
    LogMetrics,
    NonFinitePolicy,
    Periodic,
    SaveCheckpoint,
    Throughput,
)
from gpt2_jax.train.lock import WorkdirLock
from gpt2_jax.train.metrics import MetricsWriter
from gpt2_jax.train.plan import plan
from gpt2_jax.train.preemption import Preempted, StopRequest
from gpt2_jax.train.steps import split_microbatches
from gpt2_jax.train.trainer import Trainer, to_host


@dataclasses.dataclass
class Hooks:
    on_metrics: list[Callable[[int, dict], None]]  # every step, in order, host metrics
    on_state: list[Periodic]  # in order, at the steps they are due


def loop(train_fn, state, batches: Iterator[dict], last: int, hooks: Hooks,
         stop_requested: Callable[[int], int | None], checkpoint_path: Callable[[int], str]):  # fmt: skip
    """Train from state.step to `last`; returns the final state. Raises Preempted after saving
    when `stop_requested(step)` names a signal, and whatever a hook raises (Diverged)."""
    first = int(to_host(state.step)) + 1
    pending = None  # (step, device metrics) not yet read

    def settle():
        nonlocal pending
        if pending is not None:
            step, row = pending[0], {k: float(v) for k, v in to_host(pending[1]).items()}
            pending = None
            for hook in hooks.on_metrics:
                hook(step, row)

    for step in range(first, last + 1):
        state, device_metrics = train_fn(state, next(batches))
        settle()  # the previous step's, while this one runs
        pending = (step, device_metrics)
        signum = stop_requested(step)
        due = [h for h in hooks.on_state if h.due(step, last, stopping=bool(signum))]
        if step == first or due or signum:  # the first step compiled: show its loss at once
            settle()
        for hook in due:
            hook.fn(step, state)
        faults.after_step(step)  # test fault injection; nothing unless GPT2_JAX_FAULT is set
        if signum:
            raise Preempted(signum, step, checkpoint_path(step))
    settle()
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train as `config` says in `workdir`, resuming from its newest usable checkpoint if it has
    one (resume wins over init_from); returns the last training and evaluation metrics (and
    sample). Raises ConfigError, before compiling anything, for a config that cannot run;
    WorkdirBusy if another trainer holds the workdir; Preempted after a SIGTERM/SIGINT (a
    checkpoint is saved); Diverged when non-finite steps exceed max_bad_steps."""
    p = plan(config)
    summary: dict = {}
    # One trainer per workdir. Process 0 holds the lock for all processes of a run.
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock, sharding.use_mesh(p.mesh, p.rules):
        trainer = Trainer(config, p)
        ckpts = Checkpoints(workdir, max_to_keep=config.keep_checkpoints)
        with contextlib.closing(ckpts):  # closing waits for the last save
            train_it = trainer.train_iterator()
            resumed = trainer.resume(ckpts, train_it)
            state = resumed[0] if resumed else trainer.initial_state()
            start = int(to_host(state.step))
            writer = MetricsWriter(
                workdir, total_steps=p.total_steps, start_step=start, drop_after=start,
                enabled=jax.process_index() == 0, progress=config.progress_bar,
                wandb_project=config.wandb.project, wandb_name=config.wandb.name, run_config=config.to_dict())  # fmt: skip
            with writer, StopRequest() as stop:
                writer.print(trainer.describe(state))
                for note in p.notes:
                    writer.print(note)
                if resumed:
                    writer.print(resumed[1])
                if start >= p.total_steps:
                    writer.print(f"step {start} of {p.total_steps}: training is complete, nothing to do")
                hooks = _hooks(trainer, writer, ckpts, train_it, start, summary)
                batches = (to_global_batch(split_microbatches(b, p.grad_accum), trainer.train_batch_sharding)
                           for b in train_it)  # fmt: skip
                sync_every = config.log_every  # without JAX's preemption service: agree at these steps
                loop(trainer.train_fn, state, batches, p.total_steps, hooks,
                     lambda step: stop.agreed(step, sync=step % sync_every == 0), ckpts.path)  # fmt: skip
                ckpts.wait()  # the line below names a checkpoint that is on disk
                writer.print(done_line(workdir, ckpts.path(ckpts.steps()[-1]), config.sample.prompt))
    return summary


def done_line(workdir: str, checkpoint: str, prompt: str) -> str:
    """The run's last console line: where its final checkpoint is and the commands that use it."""
    text = prompt.strip()  # configs end prompts with a newline; the command stays on one line
    if not text or "\n" in text:
        text = "..."
    prompt = f'"{text}"' if not set(text) & set('"$`\\!') else shlex.quote(text)  # double quotes read best
    return (f"done: checkpoint {checkpoint}; python -m gpt2_jax.generate --workdir {workdir} --prompt {prompt}; "
            f"python -m gpt2_jax.export --workdir {workdir} --out {workdir.rstrip('/')}_hf")


def _hooks(trainer: Trainer, writer: MetricsWriter, ckpts: Checkpoints, train_it, start: int, summary: dict) -> Hooks:
    c, p = trainer.c, trainer.p
    throughput = Throughput(c.batch_size * p.block_size, flops.flops_per_token(p.model, p.block_size), trainer.peak)
    log = LogMetrics(writer, throughput, every=c.log_every, first=start + 1, last=p.total_steps,
                     batch_size=c.batch_size, block_size=p.block_size, windows_per_epoch=p.windows_per_epoch,
                     summary=summary)  # fmt: skip
    save = SaveCheckpoint(ckpts, train_it, c.to_dict(), p.model)
    on_state = [Periodic(save, every=c.checkpoint_every, at_stop=True)]
    if c.eval_every:
        evaluate = Evaluate(evaluators(trainer), writer, summary, throughput.restart)
        on_state.append(Periodic(evaluate, every=c.eval_every))
    # Last, after the step's eval row: on gs:// the metrics rows up to a checkpoint are stored with it.
    on_state.append(Periodic(lambda step, state: writer.flush(), every=c.checkpoint_every, at_stop=True))
    return Hooks(on_metrics=[log, NonFinitePolicy(c.max_bad_steps, trainer.skipped, writer, ckpts)], on_state=on_state)
