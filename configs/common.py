"""Shared config pieces: every trainer key with its default, GPT-2 model presets, `:arg` parsing.

A config file is code: `get_config(arg)` builds a ConfigDict from `base_config()`, sets what its
job needs and returns it locked, so `--config.KEY=VALUE` can change any key but a misspelt one
fails. The trainer (gpt2_jax/train/cli.py) is the only reader of these keys.
"""

from __future__ import annotations

import ml_collections

# Model shapes of the four GPT-2 sizes (as gpt2_jax.model.PRESETS; repeated here so that a
# config file stays importable without JAX).
MODEL_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults (a gpt2-small-shaped model)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.n_layer = 12
    c.model.n_head = 12
    c.model.n_embd = 768
    c.model.block_size = 1024  # training sequence length, <= n_positions
    c.model.n_positions = 1024  # position embeddings (the model's maximum context)
    c.model.dropout = 0.0
    c.model.vocab_size = 50257  # GPT-2's tokenizer; smaller only for synthetic data
    c.model.vocab_pad_multiple = 128  # 50257 -> 50304: faster matmuls, divisible by mesh axes
    c.model.remat = "none"  # 'none' | 'full' | 'dots_saveable'
    c.model.attention = "auto"  # 'auto' (cuDNN flash attention for bfloat16 on NVIDIA GPUs, else XLA) | 'xla' | 'cudnn' | 'pallas' (TPU)
    c.model.loss_chunk = 0  # > 0: compute the loss over chunks of this many positions (no full f32 logits)

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # folder of train_*.bin / val_*.bin token shards (gpt2_jax.prepare)
    c.data.bundled = ""  # 'shakespeare': use the bundled corpus when data.path is empty

    c.batch_size = 512  # global, in sequences, per optimizer step
    c.grad_accum = 1  # microbatches per step (each batch_size / grad_accum sequences)
    c.total_steps = 1000
    c.num_epochs = 0.0  # > 0: total_steps = num_epochs x training windows / batch_size instead

    c.lr = 6e-4  # peak learning rate
    c.min_lr_ratio = 0.1  # cosine decays to min_lr_ratio x lr at total_steps
    c.warmup_steps = 100
    c.weight_decay = 0.1  # on matrices only
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.adam_eps = 1e-8
    c.grad_clip = 1.0  # global norm; 0 = off

    c.eval_every = 250  # steps; 0 = no evaluation
    c.eval_batches = 20
    c.eval_batch_size = 0  # sequences; 0 = batch_size / grad_accum
    c.checkpoint_every = 1000  # steps; checkpoints are also saved at the end and on SIGTERM/SIGINT
    c.keep_checkpoints = 3  # newest N kept
    c.log_every = 10
    c.seed = 0
    c.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (parameters stay float32)
    c.init_from = "scratch"  # 'scratch' | 'hf:PATH' (a Hugging Face GPT-2 folder) | 'workdir:DIR'
    c.max_bad_steps = 0  # non-finite loss/gradient steps skipped (update not applied) before stopping; 0 = stop at the first

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = ()  # ((logical_name, mesh_axes), ...) overriding gpt2_jax.sharding.DEFAULT_RULES

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = ""  # text continued at each evaluation; '' starts from <|endoftext|>
    c.sample.length = 64  # new tokens; 0 = no samples
    c.sample.temperature = 0.8  # 0 = greedy
    c.sample.top_k = 200  # 0 = off

    c.rouge = ml_collections.ConfigDict()  # summarisation fine-tuning: ROUGE at each evaluation
    c.rouge.path = ""  # jsonl of held-out {prompt, completion} rows; '' = off
    c.rouge.examples = 32  # first N rows
    c.rouge.max_new_tokens = 64  # greedy completion length

    c.peak_flops = 0.0  # per device (per process on CPU) for MFU; 0 = from the device table
    c.progress_bar = True
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ""  # '' = off
    c.wandb.name = ""
    return c


def set_model(c: ml_collections.ConfigDict, preset: str) -> None:
    """Set the model shape keys from a GPT-2 preset name."""
    for k, v in MODEL_PRESETS[preset].items():
        c.model[k] = v


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
