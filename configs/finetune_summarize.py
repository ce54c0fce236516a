"""Fine-tune GPT-2 for summarisation on prompt/completion data (loss on the summary only), with ROUGE.

    python -m gpt2_jax.prepare --input samsum_train.jsonl --out data/samsum --completion_field summary \
        --template $'{dialogue}\nTL;DR:' --block_size 512
    python -m gpt2_jax.train --config configs/finetune_summarize.py:data=data/samsum,init=hf:gpt2_folder \
        --workdir runs/samsum

The recipe is gpt2_jax/configs/finetune_summarize.py, shipped with the package
(`--config finetune_summarize` runs it from any directory); this file re-exports it. To make
your own config, copy that file.
"""

from gpt2_jax.configs.finetune_summarize import get_config  # noqa: F401
