"""Every config key the trainer reads, with its default and meaning, as data: base_config() is built
from this table and `train --help` prints it, so the two cannot drift."""

from __future__ import annotations

# (dotted key, default, meaning). The default's type is the key's type: ml_collections refuses a
# value that cannot be cast to it (a string for an int key, say).
KEYS: tuple[tuple[str, object, str], ...] = (
    ("model.n_layer", 12, "transformer blocks"),
    ("model.n_head", 12, "attention heads (n_embd must be divisible by it)"),
    ("model.n_embd", 768, "width of the residual stream"),
    ("model.block_size", 1024, "training sequence length, <= n_positions"),
    ("model.n_positions", 1024, "position embeddings (the model's maximum context)"),
    ("model.dropout", 0.0, "dropout probability (embeddings, attention, MLP); 0 = off, as GPT-2 pretraining"),
    ("model.vocab_size", 50257, "GPT-2's tokenizer; smaller only for synthetic data"),
    ("model.vocab_pad_multiple", 128, "50257 -> 50304: faster matmuls, divisible by mesh axes"),
    ("model.remat", "none", "recompute activations in the backward: 'none' | 'full' | 'dots_saveable' "
     "(keep the weight matmuls' outputs) | 'save_qkv_proj' (keep c_attn's output) | 'save_attn_out' "
     "(keep c_attn's and the attention's outputs)"),
    ("model.scan_layers", False, "one nn.scan over stacked layers (compile time independent of depth); "
     "a checkpoint resumes only with the setting it was written with"),
    ("model.attention", "auto", "'auto' (the splash kernel on TPUs, cuDNN flash attention for bfloat16 on NVIDIA "
     "GPUs, else XLA; chosen for the mesh's devices) | 'xla' | 'cudnn' | 'pallas' (TPU splash)"),
    ("model.loss_chunk", 0, "> 0: compute the loss over chunks of this many positions (no full f32 logits)"),
    ("data.path", "", "folder of train_*.bin / val_*.bin token shards (python -m gpt2_jax.prepare, llm.c), or "
     "text / jsonl (a file, folder or glob) tokenized into the cache on first use, reused until it changes"),
    ("data.bundled", "", "'shakespeare': use the bundled corpus when data.path is empty"),
    ("batch_size", 512, "global, in sequences, per optimizer step (nanoGPT's batch_size x "
     "gradient_accumulation_steps x GPUs; HF's per_device_train_batch_size x devices x gradient_accumulation_steps)"),
    ("grad_accum", 1, "microbatches per step, accumulated inside one jitted step (each batch_size / grad_accum "
     "sequences); 0 = from microbatch_per_device. A value >= 1 wins over microbatch_per_device"),
    ("microbatch_per_device", 0, "sequences each data-parallel device runs at once (at most: fewer when batch_size / "
     "devices is smaller); with grad_accum=0, grad_accum = batch_size / (this x data-parallel devices), so a preset "
     "runs unchanged on 8 or 512 devices; 0 = off"),
    ("total_steps", 1000, "optimizer steps; the cosine schedule ends here"),
    ("num_epochs", 0.0, "> 0: total_steps = num_epochs x training windows / batch_size instead"),
    ("lr", 6e-4, "peak learning rate, reached after warmup_steps"),
    ("min_lr_ratio", 0.1, "cosine decays to min_lr_ratio x lr at total_steps (1 = constant after warmup)"),
    ("warmup_steps", 100, "linear warmup steps up to lr"),
    ("weight_decay", 0.1, "AdamW's decoupled weight decay, on matrices only"),
    ("beta1", 0.9, "AdamW's first-moment decay"),
    ("beta2", 0.95, "AdamW's second-moment decay"),
    ("adam_eps", 1e-8, "AdamW's epsilon"),
    ("grad_clip", 1.0, "clip the global gradient norm to this; 0 = off"),
    ("eval_every", 250, "steps between evaluations (validation loss, sample, ROUGE); 0 = no evaluation"),
    ("eval_batches", 20, "batches per evaluation"),
    ("eval_batch_size", 0, "sequences per evaluation batch; 0 = batch_size / grad_accum"),
    ("checkpoint_every", 1000, "steps between checkpoints; also saved at the end and on SIGTERM/SIGINT"),
    ("keep_checkpoints", 3, "the newest N checkpoints are kept"),
    ("log_every", 10, "steps between training rows (console, metrics.jsonl, TensorBoard)"),
    ("seed", 0, "parameter init, data order, dropout and samples"),
    ("dtype", "float32", "compute dtype: 'float32' | 'bfloat16' (parameters and optimizer state stay float32)"),
    ("init_from", "scratch", "'scratch' | 'hf:PATH' (a Hugging Face GPT-2 folder) | 'workdir:DIR' (its newest "
     "checkpoint)"),
    ("max_bad_steps", 0, "non-finite loss/gradient steps skipped (update not applied) before stopping; 0 = stop "
     "at the first"),
    ("mesh.data", -1, "data-parallel devices; -1: all devices not used by the other axes"),
    ("mesh.fsdp", 1, "devices that shard parameters and optimizer state (ZeRO-3 style); -1 fills"),
    ("mesh.tensor", 1, "devices that split attention heads and MLP columns; -1 fills"),
    ("mesh.rules", (), "((logical_name, mesh_axes), ...) overriding gpt2_jax.parallel.sharding.DEFAULT_RULES"),
    ("sample.prompt", "", "text continued at each evaluation; '' starts from <|endoftext|>"),
    ("sample.length", 64, "new tokens per sample; 0 = no samples"),
    ("sample.temperature", 0.8, "0 = greedy"),
    ("sample.top_k", 200, "sample from the k likeliest tokens; 0 = off"),
    ("rouge.path", "", "summarisation fine-tuning: jsonl of held-out {prompt, completion} rows scored with ROUGE "
     "at each evaluation; '' = off"),
    ("rouge.examples", 32, "the first N rows of rouge.path"),
    ("rouge.max_new_tokens", 64, "greedy completion length"),
    ("peak_flops", 0.0, "per device (per process on CPU) for MFU; 0 = from the device table"),
    ("progress_bar", True, "a tqdm bar on the console (False for log files)"),
    ("wandb.project", "", "Weights & Biases project to log to; '' = off"),
    ("wandb.name", "", "the W&B run name; '' = W&B picks one"),
)

DEFAULTS = {key: default for key, default, _ in KEYS}
HELP = {key: meaning for key, _, meaning in KEYS}
