"""What nanoGPT and the Hugging Face Trainer call our config keys: the hint an unknown key or flag gets."""

from __future__ import annotations

import difflib
from typing import Iterable

NANOGPT, HF = "nanoGPT", "HF Trainer"

# Their name -> (whose, our key or flag, what differs). An empty target: no counterpart here.
ALIASES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "learning_rate": ((NANOGPT, HF), "lr", ""),
    "gradient_accumulation_steps": ((NANOGPT, HF), "grad_accum", ""),
    "out_dir": ((NANOGPT,), "--workdir", ""),
    "max_iters": ((NANOGPT,), "total_steps", ""),
    "lr_decay_iters": ((NANOGPT,), "total_steps", "the cosine decays over total_steps"),
    "warmup_iters": ((NANOGPT,), "warmup_steps", ""),
    "min_lr": ((NANOGPT,), "min_lr_ratio", "a ratio here: min_lr / lr"),
    "decay_lr": ((NANOGPT,), "min_lr_ratio", "decay_lr=False is min_lr_ratio=1"),
    "eval_interval": ((NANOGPT,), "eval_every", ""),
    "eval_iters": ((NANOGPT,), "eval_batches", ""),
    "log_interval": ((NANOGPT,), "log_every", ""),
    "always_save_checkpoint": ((NANOGPT,), "checkpoint_every", "checkpoints are saved every checkpoint_every "
                               "steps, at the end and on SIGTERM, whatever the validation loss"),
    "eval_only": ((NANOGPT,), "", "python -m gpt2_jax.evaluate --workdir DIR --data DIR does that"),
    "dataset": ((NANOGPT,), "data.path", "a folder of token shards from python -m gpt2_jax.prepare"),
    "wandb_log": ((NANOGPT,), "wandb.project", "a non-empty project turns W&B on"),
    "wandb_project": ((NANOGPT,), "wandb.project", ""),
    "wandb_run_name": ((NANOGPT,), "wandb.name", ""),
    "bias": ((NANOGPT,), "", "GPT-2's biases are always on"),
    "compile": ((NANOGPT,), "", "every step is compiled (jax.jit)"),
    "device": ((NANOGPT,), "", "JAX uses every device it finds; mesh.data / mesh.fsdp / mesh.tensor divide them"),
    "backend": ((NANOGPT,), "", "processes join through jax.distributed (see python -m gpt2_jax.train --help)"),
    "output_dir": ((HF,), "--workdir", ""),
    "logging_dir": ((HF,), "--workdir", "TensorBoard events go into the workdir"),
    "per_device_train_batch_size": ((HF,), "batch_size", "batch_size is global here, in sequences per optimizer "
                                    "step: per_device_train_batch_size x devices x gradient_accumulation_steps"),
    "per_device_eval_batch_size": ((HF,), "eval_batch_size", "global here: per_device_eval_batch_size x devices"),
    "num_train_epochs": ((HF,), "num_epochs", ""),
    "max_steps": ((HF,), "total_steps", ""),
    "warmup_ratio": ((HF,), "warmup_steps", "a step count here: warmup_ratio x total_steps"),
    "adam_beta1": ((HF,), "beta1", ""),
    "adam_beta2": ((HF,), "beta2", ""),
    "adam_epsilon": ((HF,), "adam_eps", ""),
    "max_grad_norm": ((HF,), "grad_clip", ""),
    "lr_scheduler_type": ((HF,), "min_lr_ratio", "the schedule is linear warmup, then cosine to min_lr_ratio x lr; "
                          "min_lr_ratio=1 holds lr constant"),
    "logging_steps": ((HF,), "log_every", ""),
    "eval_steps": ((HF,), "eval_every", ""),
    "eval_strategy": ((HF,), "eval_every", "steps between evaluations; 0 = none"),
    "evaluation_strategy": ((HF,), "eval_every", "steps between evaluations; 0 = none"),
    "save_steps": ((HF,), "checkpoint_every", ""),
    "save_strategy": ((HF,), "checkpoint_every", ""),
    "save_total_limit": ((HF,), "keep_checkpoints", ""),
    "bf16": ((HF,), "dtype", "dtype='bfloat16'"),
    "fp16": ((HF,), "dtype", "no float16 here: dtype='bfloat16'"),
    "gradient_checkpointing": ((HF,), "model.remat", "model.remat='full' (or 'dots_saveable')"),
    "report_to": ((HF,), "wandb.project", "a non-empty project turns W&B on"),
    "run_name": ((HF,), "wandb.name", ""),
    "model_name_or_path": (("HF run_clm",), "init_from", "init_from='hf:PATH'"),
    "resume_from_checkpoint": ((HF,), "", "the same command on the same --workdir resumes from its newest "
                               "checkpoint"),
}


def _whose(name: str, tools: tuple[str, ...]) -> str:
    owners = " and ".join(f"{tool}'s" for tool in tools)
    return f"{name} is {owners} name"


def _alias(name: str) -> tuple[str, tuple[str, ...], str, str] | None:
    """(their name, whose, target, note) for `name` or its last part (`model.learning_rate`)."""
    for candidate in (name, name.rsplit(".", 1)[-1]):
        candidate = candidate.replace("-", "_")
        if candidate in ALIASES:
            return (candidate, *ALIASES[candidate])
    return None


def closest(name: str, known: Iterable[str]) -> list[str]:
    """Known keys `name` was probably meant as: the same last part under another section
    (`n_layer` -> model.n_layer), else the nearest spelling."""
    known = sorted(known)
    leaf = name.rsplit(".", 1)[-1].replace("-", "_")
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != name]
    if same_leaf:
        return same_leaf
    close = difflib.get_close_matches(name, known, n=1)
    if not close:  # `model.n_layers`: compare last parts
        leaves = {k.rsplit(".", 1)[-1]: k for k in known}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, sorted(leaves), n=1)]
    return close


def key_hint(name: str, known: Iterable[str]) -> str:
    """The hint for an unknown config key: '; did you mean lr? (learning_rate is ... name)', or ''."""
    alias = _alias(name)
    if alias:
        theirs, tools, target, note = alias
        if not target:
            return f"; {_whose(theirs, tools)}, with no counterpart here: {note}"
        where = f"{target} DIR (a flag, not a config key)" if target.startswith("--") else target
        return f"; did you mean {where}? ({_whose(theirs, tools)}{': ' + note if note else ''})"
    close = closest(name, known)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def flag_hint(flag: str, known: Iterable[str]) -> str:
    """The hint for an unknown flag `--NAME` (nanoGPT's `--max_iters=N`, HF's `--output_dir D`)."""
    known = set(known)
    name = flag.lstrip("-")
    if name in known:
        return f"; config keys are set as --config.{name}=VALUE"
    alias = _alias(name)
    if alias:
        theirs, tools, target, note = alias
        if not target:
            return f"; {_whose(theirs, tools)}, with no counterpart here: {note}"
        where = target if target.startswith("--") else f"--config.{target}=VALUE"
        return f"; did you mean {where}? ({_whose(theirs, tools)}{': ' + note if note else ''})"
    close = closest(name, known)
    return f"; did you mean --config.{close[0]}=VALUE?" if close else ""


def table() -> list[str]:
    """One line per foreign name, for --help: `learning_rate (nanoGPT, HF Trainer) -> lr`."""
    out = []
    for name, (tools, target, note) in ALIASES.items():
        out.append(f"{name} ({', '.join(tools)}) -> {target or 'none'}{'; ' + note if note else ''}")
    return out
