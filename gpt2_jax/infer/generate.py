"""CLI: sample completions of prompts from one or more models (workdir checkpoints or HF folders).

    python -m gpt2_jax.generate --hf out/hf --prompt "ROMEO:" --max_new_tokens 100
    python -m gpt2_jax.generate --workdir runs/a --workdir runs/b --hf gpt2_dir \\
        --prompt "Once upon a time" --temperature 0      # the same prompt, side by side

Prints prompt + completion for every (prompt, model, sample). With one model, one prompt and one
sample the tokens stream to the terminal as they are generated.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

import jax
import numpy as np

from gpt2_jax.cli import ArgumentParser, run
from gpt2_jax.errors import UserError
from gpt2_jax.infer.sampling import Sampler, SamplingConfig
from gpt2_jax.interop.load import LoadedModel, load_hf_folder, load_workdir
from gpt2_jax.interop.tokenizer import EOT, EOT_ID, get_tokenizer


class _Source(argparse.Action):
    """--workdir / --hf may repeat; keep them in command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.sources = (namespace.sources or []) + [(self.dest, value)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m gpt2_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", action=_Source, dest="workdir", metavar="DIR", help="training workdir (repeatable)")
    p.add_argument("--hf", action=_Source, dest="hf", metavar="DIR", help="Hugging Face model folder (repeatable)")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step for --workdir (default: the latest)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable; '' = "
                   "unconditional: from <|endoftext|>)")
    p.add_argument("--prompt_file", metavar="FILE", help="a file with one prompt per line")
    p.add_argument("--max_new_tokens", type=int, default=100, metavar="N",
                   help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default %(default)s)")
    p.add_argument("--top_k", type=int, default=200, metavar="K", help="sample from the K likeliest tokens; 0 = off "
                   "(default %(default)s)")
    p.add_argument("--top_p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling; 1 = off (default %(default)s)")
    p.add_argument("--num_samples", type=int, default=1, metavar="S",
                   help="samples per prompt and model (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default %(default)s)")
    p.add_argument("--continue_after_eot", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (default %(default)s)")
    p.set_defaults(sources=None)
    args = p.parse_args(argv)
    if not args.sources:
        raise UserError("give a model: --workdir DIR or --hf DIR")
    if args.step is not None and not any(kind == "workdir" for kind, _ in args.sources):
        raise UserError("--step applies to --workdir checkpoints; no --workdir was given")
    if args.num_samples < 1:
        raise UserError("--num_samples must be at least 1")
    args.prompts = list(args.prompt) + _read_prompt_file(args.prompt_file)
    if not args.prompts:
        raise UserError("give at least one --prompt (or --prompt_file)")
    return args


def _read_prompt_file(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"--prompt_file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt_file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not prompts:
        raise UserError(f"--prompt_file {path} holds no prompts")
    return prompts


def load(kind: str, path: str, step: int | None, dtype: str) -> LoadedModel:
    if kind == "hf":
        return load_hf_folder(path, dtype=dtype)
    return load_workdir(path, step, dtype=dtype)


def encode_prompt(text: str, context: int, max_new_tokens: int) -> list[int]:
    """Prompt tokens; '' means unconditional (start from <|endoftext|>). A prompt longer than
    the context keeps its last `context - max_new_tokens` tokens, with a warning."""
    if max_new_tokens < 1 or max_new_tokens >= context:
        raise UserError(f"--max_new_tokens must be between 1 and {context - 1} (the model's context is {context} tokens)")
    tokens = get_tokenizer().encode(text, allowed_special={EOT}) or [EOT_ID]
    keep = context - max_new_tokens
    if len(tokens) > keep:
        warnings.warn(f"prompt of {len(tokens)} tokens keeps its last {keep} to leave room for {max_new_tokens} new tokens")
        tokens = tokens[-keep:]
    return tokens


def complete(sampler: Sampler, tokens: list[int], args, stream: bool) -> list[str]:
    """`args.num_samples` completions (text after the prompt) of prompt `tokens` from `sampler`'s model."""
    enc = get_tokenizer()
    batch = np.tile(np.asarray(tokens, np.int32), (args.num_samples, 1))
    rng = jax.random.key(args.seed)
    stop = not args.continue_after_eot
    if not stream:
        return [enc.decode(row) for row in sampler.generate(batch, args.max_new_tokens, rng, stop)]
    out: list[int] = []
    for step in sampler.stream(batch, args.max_new_tokens, rng, stop):
        out.append(int(step[0]))
        sys.stdout.write(enc.decode([out[-1]]) if out[-1] != EOT_ID else EOT)
        sys.stdout.flush()
    return [enc.decode(out)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UserError(str(e)) from None
    models = [load(kind, path, args.step if kind == "workdir" else None, args.dtype) for kind, path in args.sources]
    samplers = [Sampler(m.config, m.params, sampling) for m in models]  # one per model, shared by the prompts
    # every prompt is checked against every model's context before anything is printed
    tokens = {(i, p): encode_prompt(p, m.config.n_positions, args.max_new_tokens) for i, m in enumerate(models) for p in args.prompts}
    stream = len(models) == 1 and len(args.prompts) == 1 and args.num_samples == 1 and sys.stdout.isatty()
    for prompt in args.prompts:
        for i, model in enumerate(models):
            header = f"=== {model.label}" + (f" | prompt: {prompt[:60]!r}" if len(args.prompts) > 1 else "") + " ==="
            print(header)
            if stream:
                sys.stdout.write(prompt)
                complete(samplers[i], tokens[i, prompt], args, stream=True)
                print()
                continue
            for n, text in enumerate(complete(samplers[i], tokens[i, prompt], args, stream=False)):
                if args.num_samples > 1:
                    print(f"--- sample {n + 1} ---")
                print(prompt + text)
        print()
    return 0


def cli() -> int:
    """`python -m gpt2_jax.generate`: main() with user errors as one line and exit status 2."""
    return run(main)
