"""CLI + train_and_evaluate(config, workdir): the training loop around steps.train_step / eval_step.

    python -m gpt2_jax.train --config configs/X.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]

The config is checked whole before anything compiles (`plan`): a config the trainer cannot run
is refused with one line, `error: ...`, and exit status 2. Writes DIR/metrics.jsonl and
TensorBoard events under DIR.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import time

import jax
import ml_collections
import numpy as np

from gpt2_jax import data as data_lib
from gpt2_jax import hf, metrics, optim, sharding, steps
from gpt2_jax.model import GPT2, GPT2Config, count_params
from gpt2_jax.sampling import Sampler, SamplingConfig
from gpt2_jax.tokenizer import EOT_ID, get_tokenizer

BUNDLED = ("shakespeare",)


class ConfigError(ValueError):
    """A config the trainer refuses; main() prints it as one `error: ...` line and exits 2."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run does, derived from the config and checked before anything is compiled."""

    model: GPT2Config
    block_size: int
    mesh: jax.sharding.Mesh
    rules: tuple
    data_path: str
    hf_path: str | None  # init_from='hf:PATH'
    total_steps: int
    windows_per_epoch: int  # training windows of block_size tokens in one epoch
    eval_batch_size: int
    prompt: tuple  # token ids that samples continue


# --- config -> plan ----------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_ranges(c: ml_collections.ConfigDict) -> None:
    _require(c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}")
    _require(c.grad_accum >= 1, f"grad_accum must be >= 1, got {c.grad_accum}")
    _require(c.total_steps >= 1 or c.num_epochs > 0, f"total_steps must be >= 1 (or set num_epochs), got {c.total_steps}")
    _require(c.num_epochs >= 0, f"num_epochs must be >= 0, got {c.num_epochs}")
    _require(c.lr > 0, f"lr must be > 0, got {c.lr}")
    _require(0 <= c.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {c.min_lr_ratio}")
    _require(c.warmup_steps >= 0, f"warmup_steps must be >= 0, got {c.warmup_steps}")
    _require(c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}")
    _require(0 <= c.beta1 < 1 and 0 <= c.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got {c.beta1}, {c.beta2}")
    _require(c.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {c.grad_clip}")
    _require(c.log_every >= 1, f"log_every must be >= 1, got {c.log_every}")
    _require(c.eval_every >= 0, f"eval_every must be >= 0 (0 = no evaluation), got {c.eval_every}")
    _require(c.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {c.checkpoint_every}")
    _require(c.eval_batch_size >= 0, f"eval_batch_size must be >= 0 (0 = batch_size / grad_accum), got {c.eval_batch_size}")
    _require(0 <= c.model.dropout < 1, f"model.dropout must be in [0, 1), got {c.model.dropout}")
    _require(c.model.block_size >= 1, f"model.block_size must be >= 1, got {c.model.block_size}")
    _require(c.sample.length >= 0, f"sample.length must be >= 0 (0 = no samples), got {c.sample.length}")
    _require(c.sample.temperature >= 0, f"sample.temperature must be >= 0 (0 = greedy), got {c.sample.temperature}")
    _require(c.sample.top_k >= 0, f"sample.top_k must be >= 0 (0 = off), got {c.sample.top_k}")
    _require(c.peak_flops >= 0, f"peak_flops must be >= 0 (0 = from the device table), got {c.peak_flops}")


def _hf_path(init_from: str) -> str | None:
    if init_from == "scratch":
        return None
    _require(init_from.startswith("hf:") and len(init_from) > 3,
             f"init_from must be 'scratch' or 'hf:PATH', got {init_from!r}")  # fmt: skip
    path = os.path.expanduser(init_from[3:])
    _require(os.path.isdir(path), f"init_from {init_from!r}: {path} is not a folder; download a model first, "
             "e.g. huggingface-cli download gpt2 --local-dir PATH")  # fmt: skip
    return path


def _model_config(c: ml_collections.ConfigDict, hf_path: str | None) -> GPT2Config:
    """GPT2Config from the config's model keys, or (init_from hf) the checkpoint's shape with the
    config's compute settings (dtype, dropout, remat, attention, vocab padding)."""
    m = c.model
    compute = dict(dropout=m.dropout, dtype=c.dtype, remat=m.remat, attention=m.attention,
                   vocab_pad_multiple=m.vocab_pad_multiple)  # fmt: skip
    try:
        if hf_path is None:
            _require(m.n_head >= 1 and m.n_embd % m.n_head == 0,
                     f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")  # fmt: skip
            return GPT2Config(vocab_size=m.vocab_size, n_positions=m.n_positions, n_embd=m.n_embd,
                              n_layer=m.n_layer, n_head=m.n_head, **compute)  # fmt: skip
        return _hf_config(hf_path, **compute)
    except hf.HFFormatError as e:
        raise ConfigError(f"init_from {c.init_from!r}: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _hf_config(path: str, **overrides) -> GPT2Config:
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            return hf.config_from_hf(json.load(f), **overrides)
    except OSError:
        raise hf.HFFormatError(f"{path} is not a Hugging Face model folder: no readable config.json") from None
    except json.JSONDecodeError as e:
        raise hf.HFFormatError(f"{file} is not valid JSON: {e}") from None


def _mesh(c: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, tuple]:
    try:
        shape = sharding.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, jax.device_count())
        rules = sharding.logical_rules(tuple(tuple(r) for r in c.mesh.rules))
    except (sharding.MeshError, TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return sharding.make_mesh(shape), rules


def _check_batch(c: ml_collections.ConfigDict, mesh, rules) -> int:
    """Checks that every microbatch splits evenly over the data-parallel devices; returns the
    evaluation batch size."""
    dp = sharding.data_parallel_size(mesh, rules)
    B, A = c.batch_size, c.grad_accum
    _require(B % A == 0, f"batch_size ({B}) must be divisible by grad_accum ({A})")
    _require((B // A) % dp == 0,
             f"batch_size / grad_accum = {B // A} sequences per microbatch must be divisible by the {dp} "
             f"data-parallel devices (mesh data x fsdp); change batch_size, grad_accum or the mesh")  # fmt: skip
    eval_bs = c.eval_batch_size or B // A
    _require(eval_bs % dp == 0, f"eval_batch_size ({eval_bs}) must be divisible by the {dp} data-parallel devices")
    return eval_bs


def _data_path(c: ml_collections.ConfigDict) -> str:
    if c.data.path:
        return os.path.expanduser(c.data.path)
    _require(c.data.bundled in BUNDLED or not c.data.bundled,
             f"data.bundled must be one of {BUNDLED} or '', got {c.data.bundled!r}")  # fmt: skip
    _require(bool(c.data.bundled), "data.path is empty: set --config.data.path=DIR, a folder of token shards "
             "made with python -m gpt2_jax.prepare")  # fmt: skip
    from gpt2_jax import corpus

    return corpus.shakespeare_path()


def _count_windows(path: str, block_size: int, split: str) -> int:
    try:
        return data_lib.num_windows(path, block_size, split)
    except data_lib.DataError as e:
        hint = "; set --config.eval_every=0 to train without evaluation" if split == "val" else ""
        raise ConfigError(f"{e}{hint}") from None


def _total_steps(c: ml_collections.ConfigDict, windows: int) -> int:
    if c.num_epochs > 0:
        return max(1, math.ceil(c.num_epochs * windows / c.batch_size))
    return c.total_steps


def _prompt(c: ml_collections.ConfigDict, model: GPT2Config) -> tuple:
    if not c.sample.length:
        return ()
    tokens = (EOT_ID, *get_tokenizer().encode(c.sample.prompt, allowed_special="all"))
    _require(len(tokens) + c.sample.length <= model.n_positions,
             f"sample prompt ({len(tokens)} tokens) + sample.length ({c.sample.length}) exceed the model's "
             f"{model.n_positions} positions")  # fmt: skip
    return tokens


def _check_shardings(model: GPT2Config, mesh, rules) -> None:
    abstract, specs = steps.abstract_state(GPT2(model), optim.make_optimizer(lambda s: 0.0), lambda s: 0.0)
    problems = sharding.indivisible(abstract.params, sharding.logical_to_shardings(specs.params, mesh, rules))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"the mesh {dict(mesh.shape)} cannot shard {problems[0]}{more}; change the mesh "
                          "(or model.vocab_pad_multiple for the vocabulary)")


def plan(c: ml_collections.ConfigDict) -> Plan:
    """Check `c` and derive the run from it; ConfigError names the first problem. Reads only
    small files (HF config.json, shard headers); compiles nothing."""
    _check_ranges(c)
    _require(c.dtype in ("float32", "bfloat16"), f"dtype must be 'float32' or 'bfloat16', got {c.dtype!r}")
    hf_path = _hf_path(c.init_from)
    model = _model_config(c, hf_path)
    _require(c.model.block_size <= model.n_positions,
             f"model.block_size ({c.model.block_size}) exceeds the model's {model.n_positions} positions"
             + (" (from init_from)" if hf_path else " (model.n_positions)"))  # fmt: skip
    mesh, rules = _mesh(c)
    eval_batch_size = _check_batch(c, mesh, rules)
    _check_shardings(model, mesh, rules)
    if c.wandb.project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("wandb.project is set but wandb is not installed: pip install 'gpt2_jax[wandb]'") from None
    prompt = _prompt(c, model)
    path = _data_path(c)
    windows = _count_windows(path, c.model.block_size, "train")
    if c.eval_every:
        _count_windows(path, c.model.block_size, "val")
    total = _total_steps(c, windows)
    _require(c.warmup_steps <= total, f"warmup_steps ({c.warmup_steps}) exceeds the {total} training steps")
    return Plan(model=model, block_size=c.model.block_size, mesh=mesh, rules=rules, data_path=path,
                hf_path=hf_path, total_steps=total, windows_per_epoch=windows,
                eval_batch_size=eval_batch_size, prompt=prompt)  # fmt: skip


# --- the run -----------------------------------------------------------------------------------

_COMPUTE_FIELDS = ("dropout", "dtype", "remat", "attention", "vocab_pad_multiple")


def _optimizer(c: ml_collections.ConfigDict, total_steps: int):
    lr_fn = optim.lr_schedule(c.lr, total_steps, c.warmup_steps, c.min_lr_ratio)
    tx = optim.make_optimizer(lr_fn, weight_decay=c.weight_decay, b1=c.beta1, b2=c.beta2, eps=c.adam_eps,
                              grad_clip=c.grad_clip)  # fmt: skip
    return tx, lr_fn


def _to_host(tree):
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


class _Trainer:
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
        _, params = hf.load_hf(p.hf_path, **{f: getattr(p.model, f) for f in _COMPUTE_FIELDS})
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
        start = int(_to_host(state.step))
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
        row = {k: float(v) for k, v in _to_host(device_metrics).items()}
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
        results = _to_host(results)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train as `config` says, writing metrics under `workdir`; returns the last training and
    evaluation metrics (and sample). Raises ConfigError, before compiling anything, for a config
    that cannot run."""
    p = plan(config)
    with sharding.use_mesh(p.mesh, p.rules):
        trainer = _Trainer(config, p)
        state = trainer.initial_state()
        writer = metrics.MetricsWriter(
            workdir, total_steps=p.total_steps, start_step=int(_to_host(state.step)),
            enabled=jax.process_index() == 0, progress=config.progress_bar,
            wandb_project=config.wandb.project, wandb_name=config.wandb.name, run_config=config.to_dict())  # fmt: skip
        with writer:
            writer.print(trainer.describe(state))
            trainer.run(state, trainer.train_iterator(), writer)
    return trainer.summary


# --- CLI -------------------------------------------------------------------------------------


class UsageError(Exception):
    """A bad command line; main() prints it as `error: ...` and exits 2."""


def parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """(config, workdir) from `--config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]`."""
    from absl import flags
    from ml_collections import config_flags

    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_file is None and "--config" in argv[:-1]:
        config_file = argv[argv.index("--config") + 1]
    if not config_file:
        raise UsageError("--config FILE is required, e.g. --config configs/shakespeare.py")
    if not os.path.isfile(config_file.split(":", 1)[0]):
        raise UsageError(f"config file {config_file.split(':', 1)[0]} does not exist")
    _check_override_keys(argv, config_file)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file[:arg]", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run folder (metrics, checkpoints)", flag_values=fv)
    try:
        extra = fv(argv)
        config = fv.config
    except flags.Error as e:
        where = f"config {config_file}: " if str(e).startswith("flag --config=") else ""
        raise UsageError(where + _first_line(e)) from None
    except Exception as e:  # errors raised by the config file's get_config
        raise UsageError(f"config {config_file}: {_first_line(e)}") from None
    if len(extra) > 1:
        raise UsageError(f"unexpected argument {extra[1]!r}")
    if not fv.workdir:
        raise UsageError("--workdir DIR is required")
    return config, fv.workdir


def _load_config(config_file: str) -> ml_collections.ConfigDict:
    from absl import flags
    from ml_collections import config_flags

    argv = ["train", f"--config={config_file}"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    try:
        fv(argv)
        return fv.config
    except Exception as e:
        raise UsageError(f"config {config_file}: {_first_line(e)}") from None


def _check_override_keys(argv: list[str], config_file: str) -> None:
    """Unknown --config.KEY overrides are errors that name the key (ml_collections' own message
    for them is a bare KeyError)."""
    keys = [m.group(1) for a in argv if (m := re.match(r"--?config\.([^=]+)", a))]
    if not keys:
        return
    known = set(_flat_keys(_load_config(config_file)))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"unknown config key {key!r} (--config.{key}){hint}")


def _flat_keys(c, prefix: str = "") -> list[str]:
    keys = []
    for k, v in c.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def _first_line(e: BaseException) -> str:
    """The message on one line; for a wrapped traceback (a config file that raised), its last
    line, which names the actual error."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if "Traceback (most recent call last):" in lines:
        return re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    return lines[0]


USER_ERRORS = (UsageError, ConfigError, data_lib.DataError, hf.HFFormatError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip())
        return 0
    try:
        config, workdir = parse_args(argv)
        train_and_evaluate(config, workdir)
    except USER_ERRORS as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
