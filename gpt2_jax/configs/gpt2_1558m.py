"""GPT-2 XL (1.5B) from scratch, parameters and optimizer state sharded with FSDP.

    python -m gpt2_jax.train --config gpt2_1558m --workdir runs/gpt2_1558m --config.data.path=DATA_DIR

DATA_DIR holds token shards: llm.c's FineWeb / OpenWebText .bin files work as they are, or make
them with `python -m gpt2_jax.prepare`. To fine-tune OpenAI's weights instead of training from
scratch: --config.init_from=hf:PATH (a Hugging Face folder, e.g. from
`hf download gpt2-xl --local-dir PATH`) and a smaller lr / total_steps.

Recipe: 1M tokens per step (1024 x 1024), lr 2e-4 (GPT-3 paper, 1.3B row) with 700 warmup
steps and cosine decay to 10%, AdamW betas (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0,
bfloat16, remat of everything but the weight matmuls; 32B tokens (as llm.c's 1.5B run). All
FSDP (mesh.fsdp=-1); add mesh.tensor=5 when FSDP alone leaves too little batch per device
(mesh.tensor must divide the 25 heads).
microbatch_per_device 2: sequences per device at a time; grad_accum follows from the device
count (see common.gpt2_recipe), --config.grad_accum=N overrides.

Argument: `:tokens=N` trains on about N tokens (default 32e9); total_steps follows.
"""

from gpt2_jax.configs import common


def get_config(arg=None):
    return common.gpt2_recipe(arg, model="gpt2-xl", tokens=32e9, batch_size=1024, microbatch_per_device=2, lr=2e-4,
                              remat="dots_saveable", fsdp=True)
