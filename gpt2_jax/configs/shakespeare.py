"""The default job: a small GPT-2 trained on the bundled Shakespeare in about 10 minutes on a 2-core CPU.

    python -m gpt2_jax.train --config shakespeare --workdir runs/shakespeare

A 6-layer, 256-wide GPT-2 (17.6M parameters, 13M of them the 50,304 x 256 tied embedding) with
GPT-2's tokenizer, on gpt2_jax/assets/shakespeare.tar.xz (42 plays and poems: 1.38M training
tokens, 4 plays and 3 poems held out for validation; prepared into ~/.cache/gpt2_jax/shakespeare
on first use). 280 steps of 16 x 128 tokens (0.41 epochs). Every 140 steps it prints the
validation loss and a sample continuing "Romeo.".

Argument: `:quick` trains for a tenth of the steps (28; a smoke run of about 70 s on a 2-core CPU).
"""

from gpt2_jax.configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, quick=False)
    c = common.base_config()
    c.model.n_layer = 6
    c.model.n_head = 4
    c.model.n_embd = 256
    c.model.block_size = 128
    c.model.n_positions = 128
    c.data.bundled = "shakespeare"
    c.batch_size = 16
    c.total_steps = 280
    c.lr = 2e-3
    c.warmup_steps = 30
    c.min_lr_ratio = 0.1
    c.weight_decay = 0.1
    c.eval_every = 140
    c.eval_batches = 8
    c.checkpoint_every = 140
    c.log_every = 10
    c.dtype = "float32"  # CPUs have no fast bfloat16 matmuls
    c.sample.prompt = "Romeo.\n"
    c.sample.length = 96
    c.sample.temperature = 0.8
    c.sample.top_k = 40
    if args.quick:
        c.total_steps //= 10
        c.warmup_steps //= 10
        c.eval_every = c.total_steps
    c.lock()
    return c
