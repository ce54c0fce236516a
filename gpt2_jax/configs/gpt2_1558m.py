"""GPT-2 XL (1.5B) from scratch, parameters and optimizer state sharded with FSDP.

    python -m gpt2_jax.train --config gpt2_1558m --workdir runs/gpt2_1558m --config.data.path=DATA_DIR

DATA_DIR holds token shards: llm.c's FineWeb / OpenWebText .bin files work as they are, or make
them with `python -m gpt2_jax.prepare`. To fine-tune OpenAI's weights instead of training from
scratch: --config.init_from=hf:PATH (a Hugging Face folder, e.g. from
`hf download gpt2-xl --local-dir PATH`) and a smaller lr / total_steps.

Recipe: 1M tokens per step (1024 x 1024), lr 2e-4 (GPT-3 paper, 1.3B row) with 700 warmup
steps and cosine decay to 10%, AdamW betas (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0,
bfloat16, remat of everything but the weight matmuls; 32B tokens (as llm.c's 1.5B run). All
FSDP (mesh.fsdp=-1); add mesh.tensor=2 or 4 when FSDP alone leaves too little batch per device.
grad_accum 64 gives microbatches of 16 sequences; per device that is 16 / devices
in the data and fsdp axes. Raise grad_accum (or set model.remat) if memory is short, lower it if
the devices are idle; the update is the same either way.

Argument: `:tokens=N` trains on about N tokens (default 32e9); total_steps follows.
"""

from gpt2_jax.configs import common


def get_config(arg=None):
    return common.gpt2_recipe(arg, model="gpt2-xl", tokens=32e9, batch_size=1024, grad_accum=64, lr=2e-4,
                              remat="dots_saveable", fsdp=True)
