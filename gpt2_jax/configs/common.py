"""Shared config pieces: the locked base config (every trainer key with its default), GPT-2 model
presets, `:arg` parsing. A config file of your own, anywhere, starts with

    from gpt2_jax.configs import common

    def get_config(arg=None):
        c = common.base_config()   # locked: setting a key it lacks (a misspelling) raises
        c.lr = 1e-3
        return c

`--config.KEY=VALUE` can then change any key but a misspelt one fails. The trainer
(gpt2_jax/train/cli.py) is the only reader of these keys; their meanings are in keys.py.
"""

from __future__ import annotations

import ml_collections

from gpt2_jax.configs.keys import KEYS

# Model shapes of the four GPT-2 sizes (as gpt2_jax.model.PRESETS; repeated here so that a
# config file stays importable without JAX).
MODEL_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults (a gpt2-small-shaped model), locked before the
    caller sets anything, so that `c.learning_rate = 1e-3` is an error, not a key nobody reads."""
    c = ml_collections.ConfigDict()
    for key, default, _ in KEYS:
        *sections, leaf = key.split(".")
        node = c
        for section in sections:
            if section not in node:
                node[section] = ml_collections.ConfigDict()
            node = node[section]
        node[leaf] = default
    c.lock()
    return c


def set_model(c: ml_collections.ConfigDict, preset: str) -> None:
    """Set the model shape keys from a GPT-2 preset name."""
    for k, v in MODEL_PRESETS[preset].items():
        c.model[k] = v


def gpt2_recipe(arg: str | None, *, model: str, tokens: float, batch_size: int, microbatch_per_device: int,
                lr: float, remat: str = "dots_saveable", fsdp: bool = False) -> ml_collections.ConfigDict:
    """The pretraining recipe the GPT-2 presets share (llm.c's, with GPT-3's learning rates): 1024-token
    sequences in bfloat16, `:tokens=N` (default `tokens`) setting total_steps, 700 warmup steps and
    cosine decay to 10%, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0; data parallel, or all-FSDP
    with `fsdp`; grad_accum follows from `microbatch_per_device` and the device count (grad_accum=0),
    so the preset runs unchanged on any slice: batch_size / (microbatch_per_device x devices in the
    data and fsdp axes), 1 where there are more devices than that needs. Lower microbatch_per_device
    (or set model.remat) if memory is short, raise it if the devices are idle; the update is the
    same either way. Returns it locked; a preset differs only in the arguments."""
    args = parse_arg(arg, tokens=tokens)
    c = base_config()
    set_model(c, model)
    c.model.block_size = 1024
    c.model.remat = remat
    # Compile one block, not n_layer of them. Inside the scan the TPU compiler cannot rematerialise
    # on its own as it does in an unrolled step, so the recipes remat (dots_saveable: keep the
    # matmul outputs, recompute the cheap rest): gpt2 124M on v5e 2x2 needs 18.6 GiB a chip
    # scanned without remat, 9.0 GiB with it (unrolled without remat: 10.2 GiB).
    c.model.scan_layers = True
    c.dtype = "bfloat16"
    c.batch_size = batch_size  # sequences of 1024 tokens per step
    c.grad_accum = 0  # from microbatch_per_device (an explicit --config.grad_accum=N wins)
    c.microbatch_per_device = microbatch_per_device
    c.total_steps = tokens_to_steps(args.tokens, c)
    c.lr = lr
    c.min_lr_ratio = 0.1
    c.warmup_steps = 700
    c.weight_decay = 0.1
    c.beta1, c.beta2 = 0.9, 0.95
    c.grad_clip = 1.0
    c.eval_every = 250
    c.eval_batches = 20
    c.checkpoint_every = 1000
    c.log_every = 10
    c.mesh.data, c.mesh.fsdp = (1, -1) if fsdp else (-1, 1)
    c.sample.prompt = "Hello, I'm a language model,"
    c.sample.length = 64
    c.lock()
    return c


def tokens_to_steps(tokens: float, c: ml_collections.ConfigDict) -> int:
    """Optimizer steps that train on about `tokens` tokens with c's batch and block size."""
    return max(1, round(tokens / (c.batch_size * c.model.block_size)))


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """`arg` as 'key=value,key2=value2,flag' -> ConfigDict of `spec`'s keys, each value converted
    to the type of its default in `spec`; a bare name sets a boolean to True."""
    out = ml_collections.ConfigDict(spec)
    for item in filter(None, (arg or "").split(",")):
        key, has_value, value = item.partition("=")
        if key not in spec:
            raise ValueError(f"unknown config argument {key!r}; this config accepts: {', '.join(sorted(spec)) or 'none'}")
        kind = type(spec[key])
        if kind is bool:
            out[key] = value.lower() in ("1", "true", "yes") if has_value else True
        elif not has_value:
            raise ValueError(f"config argument {key!r} needs a value: {key}=...")
        else:
            out[key] = kind(float(value)) if kind is int else kind(value)
    return out
