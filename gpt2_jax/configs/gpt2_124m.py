"""GPT-2 small (124M) from scratch: the llm.c / nanoGPT recipe, 10B tokens in 19,073 steps of 0.5M tokens.

    python -m gpt2_jax.train --config gpt2_124m --workdir runs/gpt2_124m --config.data.path=DATA_DIR

DATA_DIR holds token shards: llm.c's FineWeb / OpenWebText .bin files work as they are, or make
them with `python -m gpt2_jax.prepare`. To fine-tune OpenAI's weights instead of training from
scratch: --config.init_from=hf:PATH (a Hugging Face folder, e.g. from
`hf download gpt2 --local-dir PATH`) and a smaller lr / total_steps.

Recipe: llm.c's GPT-2 (124M) run: 512 x 1024 = 524,288 tokens per step, lr 6e-4 with 700
warmup steps and cosine decay to 10%, AdamW betas (0.9, 0.95), weight decay 0.1 on matrices,
gradient clipping at 1.0, bfloat16 compute, scanned layers with remat dots_saveable.
microbatch_per_device 16: sequences per device at a time; grad_accum follows from the device
count (see common.gpt2_recipe), --config.grad_accum=N overrides.

Argument: `:tokens=N` trains on about N tokens (default 10e9); total_steps follows.
"""

from gpt2_jax.configs import common


def get_config(arg=None):
    return common.gpt2_recipe(arg, model="gpt2", tokens=10e9, batch_size=512, microbatch_per_device=16, lr=6e-4)
