"""GPT-2 large (774M) from scratch, parameters and optimizer state sharded with FSDP.

    python -m gpt2_jax.train --config gpt2_774m --workdir runs/gpt2_774m --config.data.path=DATA_DIR

DATA_DIR holds token shards: llm.c's FineWeb / OpenWebText .bin files work as they are, or make
them with `python -m gpt2_jax.prepare`. To fine-tune OpenAI's weights instead of training from
scratch: --config.init_from=hf:PATH (a Hugging Face folder, e.g. from
`hf download gpt2-large --local-dir PATH`) and a smaller lr / total_steps.

Recipe: 0.5M tokens per step (512 x 1024), lr 2.5e-4 (GPT-3 paper, 760M row) with 700 warmup
steps and cosine decay to 10%, AdamW betas (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0,
bfloat16, remat of everything but the weight matmuls; 30B tokens. The mesh is all FSDP
(mesh.fsdp=-1): the batch is still split over every device, and each holds 1/N of the state.
microbatch_per_device 4: sequences per device at a time; grad_accum follows from the device
count (see common.gpt2_recipe), --config.grad_accum=N overrides.

Argument: `:tokens=N` trains on about N tokens (default 30e9); total_steps follows.
"""

from gpt2_jax.configs import common


def get_config(arg=None):
    return common.gpt2_recipe(arg, model="gpt2-large", tokens=30e9, batch_size=512, microbatch_per_device=4, lr=2.5e-4,
                              remat="dots_saveable", fsdp=True)
