"""Tiny GPT-2 (2 layers, n_embd 64) for tests and smoke runs: trains on the bundled Shakespeare in seconds.

    python -m gpt2_jax.train --config tiny --workdir /tmp/tiny

Samples start from <|endoftext|> (sample.prompt ''): the config is also run on other data
(--config.data.path=DIR), where a Shakespeare prompt would be out of place.
"""

from gpt2_jax.configs import common


def get_config(arg=None):
    common.parse_arg(arg)  # takes no arguments
    c = common.base_config()
    c.model.n_layer = 2
    c.model.n_head = 4
    c.model.n_embd = 64
    c.model.block_size = 64
    c.model.n_positions = 128
    c.data.bundled = "shakespeare"
    c.batch_size = 16
    c.total_steps = 50
    c.lr = 3e-3
    c.warmup_steps = 5
    c.weight_decay = 0.0
    c.eval_every = 25
    c.eval_batches = 2
    c.checkpoint_every = 25
    c.log_every = 5
    c.sample.length = 16
    c.lock()
    return c
