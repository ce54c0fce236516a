"""Config -> Plan: every check on a training config, done before anything is compiled.

A config the trainer cannot run raises ConfigError naming the first problem; the CLI prints it
as one `error: ...` line and exits 2. Reads only small files (HF config.json, shard headers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import ml_collections

from gpt2_jax.data import loader as data_lib
from gpt2_jax.data import val_split
from gpt2_jax.errors import UserError
from gpt2_jax.interop import hf, paths
from gpt2_jax.interop.tokenizer import EOT_ID, get_tokenizer
from gpt2_jax.model import GPT2, GPT2Config, attention_kernel, attention_problem, platform
from gpt2_jax.parallel import sharding
from gpt2_jax.train import optim, steps

BUNDLED = ("shakespeare",)
# GPT2Config fields that come from the training config even when the shape comes from init_from.
COMPUTE_FIELDS = ("dropout", "dtype", "remat", "attention", "vocab_pad_multiple", "loss_chunk", "scan_layers")
# The config's model keys that init_from replaces with the source's shape.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")


class ConfigError(UserError, ValueError):
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
    init_workdir: str | None  # init_from='workdir:DIR'
    total_steps: int
    windows_per_epoch: int  # training windows of block_size tokens in one epoch
    eval_batch_size: int
    prompt: tuple  # token ids that samples continue
    warmup_steps: int  # c.warmup_steps, clamped to total_steps (a short run warms up over all of it)
    grad_accum: int = 1  # microbatches per step: c.grad_accum, or from c.microbatch_per_device
    notes: tuple[str, ...] = ()  # `note: ...` lines for the console: what the plan changed or chose


# --- config -> plan ----------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_ranges(c: ml_collections.ConfigDict) -> None:
    _require(c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}")
    _require(c.grad_accum >= 0, f"grad_accum must be >= 1 (or 0: from microbatch_per_device), got {c.grad_accum}")
    _require(c.microbatch_per_device >= 0, f"microbatch_per_device must be >= 0 (0 = off), got {c.microbatch_per_device}")
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


def _init_source(init_from: str) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(hf_path, workdir_path, notes) named by init_from; paths None for 'scratch'. 'hf:ID' with
    a hub id (`gpt2`, `org/name`) that is not a local folder is downloaded (or found in the hub
    cache) through huggingface_hub."""
    if init_from == "scratch":
        return None, None, ()
    kind, _, path = init_from.partition(":")
    _require(kind in ("hf", "workdir") and bool(path),
             f"init_from must be 'scratch', 'hf:PATH' or 'workdir:DIR', got {init_from!r}")  # fmt: skip
    path = os.path.expanduser(path)
    if kind == "hf":
        if os.path.isdir(path):
            return path, None, ()
        _require(HUB_ID.fullmatch(path) is not None, f"init_from {init_from!r}: {path} is not a folder; download "
                 "a model first, e.g. hf download gpt2 --local-dir PATH")  # fmt: skip
        local = _hub_snapshot(init_from, path)
        return local, None, (f"note: init_from {init_from!r}: weights from the hub, in {local}",)
    _require(paths.isdir(paths.join(path, "checkpoints")),
             f"init_from {init_from!r}: {path} is not a training workdir (no checkpoints/ in it)")  # fmt: skip
    return None, path, ()


# A hub model id, `name` or `org/name`: what a local path that does not exist is taken for.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]  # what hf.load_hf reads


def _hub_snapshot(init_from: str, repo_id: str) -> str:
    """The local folder of hub model `repo_id` (config.json + safetensors only), downloaded unless
    the hub cache has it; one ConfigError line saying what to run when neither works (offline:
    HF_HUB_OFFLINE=1, or no network)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:  # offline, unreachable, no such repo, gated: the user's fix is the same
        offline = constants.HF_HUB_OFFLINE  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].removeprefix("Got: ")  # the cause
        why = "offline mode: HF_HUB_OFFLINE=1" if offline else first
        raise ConfigError(f"init_from {init_from!r}: not a folder, and the hub is unreachable/offline; download it "
                          f"with: hf download {repo_id} --local-dir PATH, then init_from=hf:PATH ({why})") from None


def _model_config(c: ml_collections.ConfigDict, hf_path: str | None, workdir: str | None = None) -> GPT2Config:
    """GPT2Config from the config's model keys, or (init_from hf / workdir) the source's shape with
    the config's compute settings (dtype, dropout, remat, attention, vocab padding)."""
    m = c.model
    compute = {f: (c.dtype if f == "dtype" else m[f]) for f in COMPUTE_FIELDS}
    try:
        if workdir is not None:
            return _workdir_config(workdir, **compute)
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


def _shape_notes(c: ml_collections.ConfigDict, model: GPT2Config) -> tuple[str, ...]:
    """A note naming the config's model keys that init_from's shape overrode (silently, before)."""
    if c.init_from == "scratch":
        return ()
    changed = [f"model.{k} {c.model[k]} -> {getattr(model, k)}" for k in SHAPE_KEYS if c.model[k] != getattr(model, k)]
    return (f"note: model shape from {c.init_from} overrides {', '.join(changed)}",) if changed else ()


def _workdir_config(path: str, **overrides) -> GPT2Config:
    from gpt2_jax.interop.checkpoint import Checkpoints

    ckpts = Checkpoints(path, create=False)
    _require(bool(ckpts.steps()), f"init_from 'workdir:{path}': no checkpoints in {ckpts.directory}")
    return ckpts.newest_usable(lambda step: ckpts.model_config(step, **overrides))


def _hf_config(path: str, **overrides) -> GPT2Config:
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            return hf.config_from_hf(json.load(f), **overrides)
    except OSError:
        raise hf.HFFormatError(f"{path} is not a Hugging Face model folder: no readable config.json") from None
    except json.JSONDecodeError as e:
        raise hf.HFFormatError(f"{file} is not valid JSON: {e}") from None


def _attention(model: GPT2Config, devices) -> GPT2Config:
    """`model` with attention resolved to the kernel this run uses on `devices` ('auto' picks;
    None: this process's); a kernel these devices cannot run is refused."""
    where = None if devices is None else platform(devices)
    problem = attention_problem(model, model.attention, where)
    _require(problem is None, f"model.attention={model.attention!r} {problem}; use 'auto' (the fastest kernel "
             "these devices run) or 'xla'")  # fmt: skip
    return model.replace(attention=attention_kernel(model, where))


def _mesh(c: ml_collections.ConfigDict, devices) -> tuple[jax.sharding.Mesh, tuple]:
    try:
        count = jax.device_count() if devices is None else len(devices)
        shape = sharding.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, count)
        rules = sharding.logical_rules(tuple(tuple(r) for r in c.mesh.rules))
    except (sharding.MeshError, TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return sharding.make_mesh(shape, devices), rules


def _grad_accum(c: ml_collections.ConfigDict, dp: int) -> tuple[int, tuple[str, ...]]:
    """(microbatches per step, notes): grad_accum when set (>= 1: an explicit choice wins), else
    from microbatch_per_device on `dp` data-parallel devices, so that a preset runs unchanged on
    any number of devices (grad_accum 1 once batch_size / dp is no more than it)."""
    B, m = c.batch_size, c.microbatch_per_device
    if c.grad_accum or not m:
        note = f"note: grad_accum {c.grad_accum} overrides microbatch_per_device {m}" if c.grad_accum and m else ""
        return c.grad_accum or 1, (note,) if note else ()
    _require(B % dp == 0, f"batch_size ({B}) must be divisible by the {dp} data-parallel devices (mesh data x fsdp)")
    per_device = B // dp
    _require(per_device <= m or per_device % m == 0,
             f"batch_size / data-parallel devices = {B} / {dp} = {per_device} sequences per device is not a multiple "
             f"of microbatch_per_device ({m}); change microbatch_per_device or batch_size, or set grad_accum")  # fmt: skip
    return max(1, per_device // m), ()


def _check_batch(c: ml_collections.ConfigDict, mesh, rules, A: int) -> int:
    """Checks that every microbatch splits evenly over the data-parallel devices; returns the
    evaluation batch size."""
    dp = sharding.data_parallel_size(mesh, rules)
    B = c.batch_size
    _require(B % A == 0, f"batch_size ({B}) must be divisible by grad_accum ({A})")
    _require((B // A) % dp == 0,
             f"batch_size / grad_accum = {B // A} sequences per microbatch must be divisible by the {dp} "
             f"data-parallel devices (mesh data x fsdp); change batch_size, grad_accum or the mesh")  # fmt: skip
    eval_bs = c.eval_batch_size or B // A
    _require(eval_bs % dp == 0, f"eval_batch_size ({eval_bs}) must be divisible by the {dp} data-parallel devices")
    return eval_bs


def _say(line: str) -> None:
    if jax.process_index() == 0:  # every process resolves the data; one tells the console
        print(line, flush=True)


def _data_path(c: ml_collections.ConfigDict) -> str:
    """The folder of shards: data.path's, prepared from text / jsonl on first use, or the bundled corpus's."""
    if c.data.path:
        from gpt2_jax.data import resolve

        try:
            return resolve.shard_folder(os.path.expanduser(c.data.path), say=_say)
        except UserError as e:
            raise ConfigError(f"data.path {c.data.path}: {e}") from None
    _require(c.data.bundled in BUNDLED or not c.data.bundled,
             f"data.bundled must be one of {BUNDLED} or '', got {c.data.bundled!r}")  # fmt: skip
    _require(bool(c.data.bundled), "data.path is empty: set --config.data.path=DIR, a folder of token shards "
             "made with python -m gpt2_jax.prepare")  # fmt: skip
    from gpt2_jax.data import corpus

    return corpus.shakespeare_path()


def _count_windows(path: str, block_size: int, split: str) -> int:
    try:
        windows = data_lib.num_windows(path, block_size, split)
    except data_lib.DataError as e:
        hint = "; set --config.eval_every=0 to train without evaluation" if split == "val" else ""
        raise ConfigError(f"{e}{hint}") from None
    tiny = val_split.tiny_warning(windows * block_size) if split == "val" else None
    if tiny:  # a perplexity to two decimals from a few hundred tokens should not go without comment
        _say(f"warning: {tiny}")
    return windows


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
        tensor = dict(mesh.shape).get("tensor", 1)
        why = (f"mesh.tensor must divide n_head ({model.n_head}); change the mesh"
               if model.n_head % tensor else "change the mesh (or model.vocab_pad_multiple for the vocabulary)")
        raise ConfigError(f"the mesh {dict(mesh.shape)} cannot shard {problems[0]}{more}; {why}")


def _check_rouge(c: ml_collections.ConfigDict, model: GPT2Config) -> None:
    if not c.rouge.path:
        return
    _require(os.path.isfile(c.rouge.path), f"rouge.path {c.rouge.path} is not a file (a jsonl of prompt/completion "
             "rows, e.g. the val_pairs.jsonl that prepare --completion_field writes)")  # fmt: skip
    _require(c.rouge.examples >= 1, f"rouge.examples must be >= 1, got {c.rouge.examples}")
    _require(1 <= c.rouge.max_new_tokens < model.n_positions,
             f"rouge.max_new_tokens must be in [1, {model.n_positions}), got {c.rouge.max_new_tokens}")  # fmt: skip
    try:
        import rouge_score  # noqa: F401
    except ImportError:
        raise ConfigError("rouge.path is set but rouge-score is not installed: pip install rouge-score") from None


def plan(c: ml_collections.ConfigDict, data: bool = True, devices=None) -> Plan:
    """Check `c` and derive the run from it; ConfigError names the first problem. Reads only
    small files (HF config.json, shard headers); compiles nothing. data=False (bench, dry runs)
    skips the data: data_path is '', windows_per_epoch 0 and total_steps c.total_steps.
    `devices` (default: all of this job's) are those the mesh is made of, and whose platform
    the attention kernel is chosen and checked for (a TPU topology's, for a dry run)."""
    _check_ranges(c)
    _require(c.dtype in ("float32", "bfloat16"), f"dtype must be 'float32' or 'bfloat16', got {c.dtype!r}")
    hf_path, init_workdir, notes = _init_source(c.init_from)
    model = _attention(_model_config(c, hf_path, init_workdir), devices)
    notes += _shape_notes(c, model)
    _require(c.model.block_size <= model.n_positions,
             f"model.block_size ({c.model.block_size}) exceeds the model's {model.n_positions} positions"
             + (" (from init_from)" if hf_path or init_workdir else " (model.n_positions)"))  # fmt: skip
    mesh, rules = _mesh(c, devices)
    grad_accum, accum_notes = _grad_accum(c, sharding.data_parallel_size(mesh, rules))
    notes += accum_notes
    eval_batch_size = _check_batch(c, mesh, rules, grad_accum)
    _check_shardings(model, mesh, rules)
    if c.wandb.project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("wandb.project is set but wandb is not installed: pip install 'gpt2_jax[wandb]'") from None
    _check_rouge(c, model)
    prompt = _prompt(c, model)
    path, windows, total = "", 0, c.total_steps
    if data:
        path = _data_path(c)
        windows = _count_windows(path, c.model.block_size, "train")
        if c.eval_every:
            _count_windows(path, c.model.block_size, "val")
        total = _total_steps(c, windows)
    warmup = min(c.warmup_steps, total)
    if warmup < c.warmup_steps:  # a short (smoke, fine-tune) run of a long recipe: still runs
        notes += (f"note: warmup_steps {c.warmup_steps} > total_steps {total}; warming up over {total} steps",)
    return Plan(model=model, block_size=c.model.block_size, mesh=mesh, rules=rules, data_path=path,
                hf_path=hf_path, init_workdir=init_workdir, total_steps=total, windows_per_epoch=windows,
                eval_batch_size=eval_batch_size, prompt=prompt, warmup_steps=warmup, grad_accum=grad_accum,
                notes=notes)  # fmt: skip


