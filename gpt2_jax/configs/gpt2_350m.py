"""GPT-2 medium (350M) from scratch: the 124M recipe with GPT-3's medium learning rate.

    python -m gpt2_jax.train --config gpt2_350m --workdir runs/gpt2_350m --config.data.path=DATA_DIR

DATA_DIR holds token shards: llm.c's FineWeb / OpenWebText .bin files work as they are, or make
them with `python -m gpt2_jax.prepare`. To fine-tune OpenAI's weights instead of training from
scratch: --config.init_from=hf:PATH (a Hugging Face folder, e.g. from
`hf download gpt2-medium --local-dir PATH`) and a smaller lr / total_steps.

Recipe: 0.5M tokens per step (512 x 1024), lr 3e-4 (GPT-3 paper, 350M row) with 700 warmup
steps and cosine decay to 10%, AdamW betas (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0,
bfloat16, scanned layers with remat dots_saveable; 30B tokens (as llm.c's 350M run).
microbatch_per_device 8: sequences per device at a time; grad_accum follows from the device
count (see common.gpt2_recipe), --config.grad_accum=N overrides.

Argument: `:tokens=N` trains on about N tokens (default 30e9); total_steps follows.
"""

from gpt2_jax.configs import common


def get_config(arg=None):
    return common.gpt2_recipe(arg, model="gpt2-medium", tokens=30e9, batch_size=512, microbatch_per_device=8, lr=3e-4)
