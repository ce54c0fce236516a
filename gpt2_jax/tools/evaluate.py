"""CLI: loss / perplexity over token shards, HellaSwag accuracy and summary ROUGE, for a checkpoint or an HF folder.

    python -m gpt2_jax.evaluate --workdir runs/shakespeare --data ~/.cache/gpt2_jax/shakespeare
    python -m gpt2_jax.evaluate --hf gpt2_folder --data fineweb10B --hellaswag hellaswag_val.jsonl
    python -m gpt2_jax.evaluate --workdir runs/samsum --summaries data/samsum/val_pairs.jsonl

Prints one JSON object on stdout (model, step, loss, ppl, tokens; hellaswag_acc, hellaswag_acc_norm
and hellaswag_examples with --hellaswag; rouge1, rouge2, rougeL, summary_mean_len with
--summaries, whose rows with predictions go to a jsonl); progress goes to stderr.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2_jax.cli import ArgumentParser, run
from gpt2_jax.errors import UserError
from gpt2_jax.interop.load import LoadedModel, load_hf_folder, load_workdir
from gpt2_jax.interop.tokenizer import get_tokenizer
from gpt2_jax.model import GPT2, GPT2Config


@functools.partial(jax.jit, static_argnums=0)
def _token_losses(config: GPT2Config, params, inputs, targets, weights):
    """Per-row sum of weighted next-token losses and of weights: float32 (B,), (B,)."""
    logits = GPT2(config).apply({"params": params}, inputs)
    logz = jax.nn.logsumexp(logits, axis=-1)
    nll = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (nll * weights).sum(-1), weights.sum(-1)


def shard_loss(model: LoadedModel, data: str, *, split: str, batch_size: int, block_size: int,
               max_batches: int | None) -> dict:  # fmt: skip
    """Token-weighted mean loss over one pass of `split` windows (every window once)."""
    from gpt2_jax.data.loader import make_eval_iterator

    it = make_eval_iterator(data, block_size=block_size, global_batch_size=batch_size, split=split)
    total = it.num_batches if max_batches is None else min(max_batches, it.num_batches)
    loss_sum, count = 0.0, 0.0
    for _, batch in zip(range(total), tqdm(it, total=total, desc=f"{split} loss", file=sys.stderr, unit="batch")):
        s, n = _token_losses(model.config, model.params, batch["inputs"], batch["targets"], batch["weights"])
        loss_sum += float(s.sum())
        count += float(n.sum())
    if count == 0:
        raise UserError(f"{data} has no {split} windows of {block_size + 1} tokens to evaluate")
    loss = loss_sum / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count)}


# --- HellaSwag ------------------------------------------------------------------------------


def read_hellaswag(path: str) -> list[dict]:
    """Examples of the official hellaswag_{val,train}.jsonl: ctx, endings (4), label."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    examples.append(_hellaswag_example(line, f"{path}:{n}"))
    except FileNotFoundError:
        raise UserError(f"--hellaswag {path} does not exist") from None
    if not examples:
        raise UserError(f"--hellaswag {path} holds no examples")
    return examples


def _hellaswag_example(line: str, where: str) -> dict:
    try:
        ex = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{where} is not JSON") from None
    if not isinstance(ex, dict) or not {"ctx", "endings", "label"} <= set(ex):
        raise UserError(f"{where} lacks ctx, endings or label (is this hellaswag_val.jsonl?)")
    if len(ex["endings"]) != 4 or not 0 <= int(ex["label"]) < 4:
        raise UserError(f"{where} needs 4 endings and a label in 0..3")
    return ex


def _hellaswag_rows(ex: dict, context: int) -> tuple[list[list[int]], list[int]]:
    """4 token rows (context + ending, llm.c style: the ending is encoded with a leading space)
    and the length of each ending; long rows keep their last `context + 1` tokens."""
    enc = get_tokenizer()
    ctx = enc.encode(ex["ctx"])
    rows, ends = [], []
    for ending in ex["endings"]:
        end = enc.encode(" " + ending)
        rows.append((ctx + end)[-(context + 1):])
        ends.append(min(len(end), context))
    return rows, ends


def _hellaswag_batches(examples: list[dict], context: int, per_batch: int) -> Iterator[tuple]:
    """Fixed-shape batches (per_batch examples x 4 rows, padded to one length) so the scoring
    function compiles once: inputs, targets, weights on ending tokens, labels."""
    rows = [_hellaswag_rows(ex, context) for ex in examples]
    length = min(context, max(len(r) - 1 for rs, _ in rows for r in rs))
    for i in range(0, len(examples), per_batch):
        chunk, labels = rows[i : i + per_batch], [int(ex["label"]) for ex in examples[i : i + per_batch]]
        n = len(chunk)
        tokens = np.zeros((per_batch * 4, length + 1), np.int32)
        weights = np.zeros((per_batch * 4, length), np.float32)
        for e, (rs, ends) in enumerate(chunk):
            for j, (row, end) in enumerate(zip(rs, ends)):
                tokens[4 * e + j, : len(row)] = row
                weights[4 * e + j, len(row) - 1 - end : len(row) - 1] = 1.0  # predict the ending
        yield tokens[:, :-1], tokens[:, 1:], weights, labels, n


def hellaswag(model: LoadedModel, examples: list[dict], per_batch: int = 4) -> dict:
    """acc: the ending with the lowest total loss; acc_norm: lowest mean loss per token (llm.c)."""
    correct = correct_norm = 0
    batches = _hellaswag_batches(examples, model.config.n_positions, per_batch)
    total = -(-len(examples) // per_batch)
    for inputs, targets, weights, labels, n in tqdm(batches, total=total, desc="hellaswag", file=sys.stderr):
        sums, counts = _token_losses(model.config, model.params, inputs, targets, weights)
        sums, counts = np.asarray(sums).reshape(-1, 4)[:n], np.asarray(counts).reshape(-1, 4)[:n]
        correct += int((sums.argmin(-1) == labels).sum())
        correct_norm += int(((sums / counts).argmin(-1) == labels).sum())
    return {"hellaswag_acc": correct / len(examples), "hellaswag_acc_norm": correct_norm / len(examples),
            "hellaswag_examples": len(examples)}  # fmt: skip


def _read_summaries(args) -> list[dict]:
    from gpt2_jax.data.pairs import read_pairs

    rows = read_pairs(args.summaries, args.prompt_field, args.completion_field, args.template)
    if not rows:
        raise UserError(f"--summaries {args.summaries} holds no rows")
    if args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    return rows[: args.max_examples] if args.max_examples else rows


def _default_out(path: str) -> str:
    return os.path.basename(path).removesuffix(".jsonl") + ".predictions.jsonl"


def summaries(model: LoadedModel, rows: list[dict], max_new_tokens: int, out: str) -> dict:
    """ROUGE of greedy completions of each row's prompt; rows with predictions written to `out`."""
    from gpt2_jax.infer.rouge import rouge_eval

    if not 1 <= max_new_tokens < model.config.n_positions:
        raise UserError(f"--max_new_tokens must be between 1 and {model.config.n_positions - 1}")
    print(f"summarising {len(rows)} prompts ...", file=sys.stderr)
    scores, predictions = rouge_eval(model.config, model.params, rows, max_new_tokens)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        for r, pred in zip(rows, predictions):
            f.write(json.dumps({"prompt": r["prompt"], "reference": r["completion"], "prediction": pred}) + "\n")
    os.replace(tmp, out)
    return {**{k: scores[k] for k in ("rouge1", "rouge2", "rougeL")}, "summary_mean_len": scores["mean_len"],
            "summaries": len(rows), "summaries_out": out}  # fmt: skip


# --- CLI ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None):
    p = ArgumentParser(prog="python -m gpt2_jax.evaluate", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir")
    source.add_argument("--hf", help="Hugging Face model folder")
    p.add_argument("--step", type=int, help="checkpoint step for --workdir (default: the latest)")
    p.add_argument("--data", help="folder of token shards (train_*.bin / val_*.bin)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--batch_size", type=int, default=8, help="sequences per batch")
    p.add_argument("--block_size", type=int, help="tokens per sequence (default: the model's context)")
    p.add_argument("--max_batches", type=int, help="stop after this many batches")
    p.add_argument("--hellaswag", help="hellaswag_val.jsonl (the official format)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    s = p.add_argument_group("summaries: greedy completions scored with ROUGE-1/2/L")
    s.add_argument("--summaries", metavar="FILE", help="jsonl of prompts and reference completions (e.g. the "
                   "val_pairs.jsonl of prepare --completion_field)")  # fmt: skip
    s.add_argument("--summaries_out", metavar="FILE", help="jsonl of prompt / reference / prediction rows "
                   "(default: FILE's name + .predictions.jsonl, in the current folder)")  # fmt: skip
    s.add_argument("--max_new_tokens", type=int, default=64, help="completion length (default 64)")
    s.add_argument("--prompt_field", default="prompt")
    s.add_argument("--completion_field", default="completion")
    s.add_argument("--template", help='prompt built from the row\'s fields, e.g. "{dialogue}\\nTL;DR:"')
    s.add_argument("--max_examples", type=int, help="score the first N rows only")
    args = p.parse_args(argv)
    if args.data is None and args.hellaswag is None and args.summaries is None:
        raise UserError("nothing to evaluate: give --data DIR, --hellaswag FILE and/or --summaries FILE")
    if args.step is not None and args.workdir is None:
        raise UserError("--step applies to --workdir checkpoints")
    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise UserError("--batch_size and --max_batches must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    examples = read_hellaswag(args.hellaswag) if args.hellaswag else None
    pairs = _read_summaries(args) if args.summaries else None
    if args.workdir:
        model = load_workdir(args.workdir, args.step, dtype=args.dtype)
    else:
        model = load_hf_folder(args.hf, dtype=args.dtype)
    result = {"model": model.label, "step": model.step}
    if args.data:
        block_size = args.block_size or model.config.n_positions
        if not 1 <= block_size <= model.config.n_positions:
            raise UserError(f"--block_size must be between 1 and the model's context {model.config.n_positions}")
        result.update(shard_loss(model, args.data, split=args.split, batch_size=args.batch_size,
                                 block_size=block_size, max_batches=args.max_batches))  # fmt: skip
    if examples is not None:
        result.update(hellaswag(model, examples))
    if pairs is not None:
        result.update(summaries(model, pairs, args.max_new_tokens, args.summaries_out or _default_out(args.summaries)))
    print(json.dumps(result))
    return 0


def cli() -> int:
    """`python -m gpt2_jax.evaluate`: main() with user errors as one line and exit status 2."""
    return run(main)
