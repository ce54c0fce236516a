"""Measures greedy decoding speed (new tokens/s): gpt2_jax's KV-cache Sampler next to transformers'
GPT2LMHeadModel.generate on the same random weights, in the same run.

    python scripts/bench_decode.py [--models tiny gpt2] [--batch 1 8] [--prompt_len 16]
                                   [--new_tokens 128] [--repeats 3] [--device cpu]

For each model (a gpt2_jax preset, randomly initialised, saved with save_hf and loaded by
transformers from that folder) and batch size: a random prompt of --prompt_len tokens, then
--new_tokens greedy tokens, end of text ignored (both sides run to the full length), timed end
to end (prefill + decode, tokens copied to the host) after one warm-up call that compiles. Best of
--repeats, the two sides taking turns (the machine may be shared: compare ratios within a run). `tokens_match` says whether both produced the same tokens (float32 on both sides, so
they should, up to rare near-ties). The JAX cache is fixed at the context length (n_positions)
so the decode step compiles once; transformers' cache grows with the sequence.
Prints a table, then one JSON line per measurement and a final JSON line with all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "gpt2"], help="gpt2_jax presets (tiny, gpt2, ...)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="JAX platform and torch device (cpu, or cuda for a GPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def best_of_interleaved(fns: dict, repeats: int) -> dict:
    """{name: (best seconds, last output)}; one warm-up call each (compiles / allocates), then the
    timed calls alternate between them so that load from other processes hits both alike."""
    outs = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], outs[name]) for name in fns}


def jax_generate(config, params, prompt: np.ndarray, new_tokens: int):
    import jax

    from gpt2_jax.infer.sampling import Sampler, SamplingConfig

    sampler = Sampler(config, params, SamplingConfig(temperature=0.0))
    rng = jax.random.key(0)
    return lambda: sampler.generate(prompt, new_tokens, rng, stop_at_eot=False)


def torch_generate(model, prompt: np.ndarray, new_tokens: int, device: str):
    import torch

    ids = torch.tensor(prompt, dtype=torch.long, device=device)

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, use_cache=True)  # fmt: skip
        return out[:, prompt.shape[1] :].cpu().tolist()

    return run


def load_torch(folder: str, device: str):
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    transformers.utils.logging.disable_progress_bar()

    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    # run to the full length, as the JAX side does: no stop at <|endoftext|>
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 50256
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", args.device.replace("cuda", "cuda,cpu"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    import torch

    from gpt2_jax.interop.hf import save_hf
    from gpt2_jax.model import GPT2Config, count_params, init_params

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls, as torch does
    rows = []
    for name in args.models:
        config = GPT2Config.from_preset(name)
        params = init_params(config, jax.random.key(args.seed))
        with tempfile.TemporaryDirectory() as folder:
            save_hf(os.path.join(folder, "hf"), config, params)
            model = load_torch(os.path.join(folder, "hf"), args.device)
        for batch in args.batch:
            prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, (batch, args.prompt_len))
            prompt = prompt.astype(np.int32)
            new = min(args.new_tokens, config.n_positions - args.prompt_len)
            timed = best_of_interleaved(
                {"jax": jax_generate(config, params, prompt, new),
                 "torch": torch_generate(model, prompt, new, args.device)}, args.repeats)  # fmt: skip
            (jax_s, jax_tokens), (torch_s, torch_tokens) = timed["jax"], timed["torch"]
            row = {
                "model": name, "params": count_params(params), "batch": batch, "prompt_len": args.prompt_len,
                "new_tokens": new, "jax_tokens_per_sec": round(batch * new / jax_s, 1),
                "torch_tokens_per_sec": round(batch * new / torch_s, 1), "ratio": round(torch_s / jax_s, 2),
                "jax_ms_per_token": round(1e3 * jax_s / new, 2), "torch_ms_per_token": round(1e3 * torch_s / new, 2),
                "tokens_match": [list(r) for r in jax_tokens] == torch_tokens,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    env = {"device": args.device, "jax": jax.__version__, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}  # fmt: skip
    print_table(rows, env)
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"bench": "decode", **env, "results": rows}))
    return 0


def print_table(rows, env) -> None:
    print(f"greedy decoding, new tokens/s (best of runs; {env['device']}, {env['cpus']} CPUs, "
          f"jax {env['jax']}, torch {env['torch']} with {env['torch_threads']} threads)")  # fmt: skip
    header = f"{'model':<8}{'params':>13}{'batch':>6}{'new':>5}{'gpt2_jax':>11}{'HF torch':>11}{'jax/HF':>8}  same tokens"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<8}{r['params']:>13,}{r['batch']:>6}{r['new_tokens']:>5}{r['jax_tokens_per_sec']:>11,.1f}"
              f"{r['torch_tokens_per_sec']:>11,.1f}{r['ratio']:>8.2f}  {r['tokens_match']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
