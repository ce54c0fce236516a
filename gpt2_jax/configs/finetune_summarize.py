"""Fine-tune GPT-2 for summarisation on prompt/completion data (loss on the summary only), with ROUGE.

    python -m gpt2_jax.prepare --input samsum_train.jsonl --out data/samsum --completion_field summary \
        --template $'{dialogue}\nTL;DR:' --block_size 512
    python -m gpt2_jax.train --config finetune_summarize:data=data/samsum,init=hf:gpt2_folder \
        --workdir runs/samsum

Arguments (comma-separated): data=DIR (from prepare --completion_field; its val_pairs.jsonl is the
held-out set that ROUGE is measured on at each evaluation), init=hf:PATH | workdir:DIR | scratch
(default scratch), tiny (a 2-layer, 64-wide model and a short run: the CPU walkthrough in the
README), steps=N (default 600; 300 with tiny).
"""

import os

from gpt2_jax.configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, data="", init="scratch", tiny=False, steps=0)
    c = common.base_config()
    c.data.path = args.data
    c.init_from = args.init
    c.model.block_size = 512
    c.batch_size = 16
    c.total_steps = args.steps or 600
    c.lr = 1e-4  # fine-tuning a pretrained model: 6x below the pretraining peak
    c.warmup_steps = 20
    c.min_lr_ratio = 0.1
    c.weight_decay = 0.0
    c.eval_every = 100
    c.eval_batches = 8
    c.checkpoint_every = 200
    c.log_every = 10
    c.dtype = "float32"
    c.sample.length = 0  # ROUGE on held-out prompts instead of a free-running sample
    c.rouge.path = os.path.join(args.data, "val_pairs.jsonl") if args.data else ""
    c.rouge.examples = 32
    c.rouge.max_new_tokens = 32
    if args.tiny:
        c.model.n_layer, c.model.n_head, c.model.n_embd = 2, 4, 64
        c.model.block_size = c.model.n_positions = 128
        c.total_steps = args.steps or 300
        c.lr = 3e-3  # a 2-layer model learns fast; the same lr from scratch or not, for a fair comparison
        c.eval_every = 100
        c.rouge.max_new_tokens = 24
    c.lock()
    return c
