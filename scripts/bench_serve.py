"""Measures the completions server (python -m gpt2_jax.serve) under 1, 4 and 16 concurrent clients:
requests/s and generated tokens/s, next to transformers' generate on the same random weights, run
one request at a time and in batches.

    python scripts/bench_serve.py [--models tiny gpt2] [--clients 1 4 16] [--requests 64 16]
                                  [--max_tokens 64 32] [--repeats 2] [--hf_batch 16]

For each model (a gpt2_jax preset, randomly initialised, saved with save_hf): one fixed workload
of --requests prompts of 8 to 40 tokens (random common words, seeded), each asking for
--max_tokens greedy tokens (a request ends early at <|endoftext|>; tokens are counted from the
replies). The server runs in a subprocess with --max_batch 16; each of C client threads (the
`openai` client) sends the workload's next request as soon as its last one returned. Warm-up
passes first, until one compiles no new shape (the server's /health lists them); then best of
--repeats. transformers runs the same prompts with
generate(do_sample=False): one at a time, then --hf_batch at a time (left-padded, as transformers
batches prompts of different lengths). `same_as_hf` counts the server's texts equal to the
one-at-a-time ones. Prints a table, then one JSON line per measurement and a final one with all.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

COMMON = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
          "word but not what all were we when your can said there use an each which she do how their if will up "
          "other about out many then them these so some her would make like him into time has look two "
          "more").split()  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "gpt2"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--requests", nargs="+", type=int, default=[64, 16], help="per model, in --models order")
    p.add_argument("--max_tokens", nargs="+", type=int, default=[64, 32], help="per model, in --models order")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hf_batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def workload(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(COMMON, rng.integers(8, 41))) for _ in range(n)]


def start_server(folder: str, log: str) -> tuple[subprocess.Popen, str]:
    out = open(log, "w")
    command = [sys.executable, "-m", "gpt2_jax.serve", "--hf", folder, "--port", "0", "--max_batch", "16"]
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        assert proc.poll() is None, "the server exited"
        line = open(log).read().split("\n")[0]
        if line.endswith("/v1"):
            return proc, line.split(" at ")[-1]
        time.sleep(0.1)
    raise RuntimeError("the server did not start")


def shapes(url: str) -> list[str]:
    """The prefill / decode shapes the server has compiled (its /health says)."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=60) as r:
        return json.loads(r.read())["shapes"]


def run_clients(clients: list, prompts: list[str], max_tokens: int) -> tuple[float, list]:
    """(seconds, [(text, completion_tokens)] in workload order), a thread per client."""
    results: list = [None] * len(prompts)
    todo = iter(range(len(prompts)))

    def client_loop(client):
        for i in todo:  # shared iterator: each request goes to the first free client
            out = client.completions.create(model="m", prompt=prompts[i], max_tokens=max_tokens, temperature=0)
            results[i] = (out.choices[0].text, out.usage.completion_tokens)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        for f in [pool.submit(client_loop, c) for c in clients]:
            f.result()
    return time.perf_counter() - start, results


def hf_generate(model, enc, prompts: list[str], max_tokens: int, batch: int) -> tuple[float, list]:
    import torch

    results = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = [enc.encode(p) for p in prompts[i : i + batch]]
        width = max(map(len, ids))
        tokens = torch.tensor([[50256] * (width - len(t)) + t for t in ids])  # left padding
        mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in ids])
        with torch.inference_mode():
            out = model.generate(tokens, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=50256)  # fmt: skip
        for row in out[:, width:].tolist():
            row = row[: row.index(50256) + 1] if 50256 in row else row
            results.append((enc.decode([t for t in row if t != 50256]), len(row)))
    return time.perf_counter() - start, results


def measure(name: str, config, params, args, n: int, max_tokens: int) -> list[dict]:
    import openai
    import torch
    from transformers import GPT2LMHeadModel

    from gpt2_jax.interop.hf import save_hf
    from gpt2_jax.interop.tokenizer import get_tokenizer

    prompts, enc, rows = workload(n, args.seed), get_tokenizer(), []
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "hf")
        save_hf(folder, config, params)
        proc, url = start_server(folder, os.path.join(tmp, "server.log"))
        pool = [openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
                for _ in range(max(args.clients))]  # fmt: skip
        try:
            for clients in args.clients:  # warm-up: until a pass compiles no new shape
                for _ in range(6):
                    before = shapes(url)
                    run_clients(pool[:clients], prompts, max_tokens)
                    if shapes(url) == before:
                        break
            for clients in args.clients:
                runs = [run_clients(pool[:clients], prompts, max_tokens) for _ in range(args.repeats)]
                rows.append(row(name, f"gpt2_jax serve, {clients} clients", *min(runs, key=lambda r: r[0])))
        finally:
            proc.terminate()
            proc.wait(120)
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    for batch in (1, args.hf_batch):
        hf_generate(model, enc, prompts[:batch], max_tokens, batch)  # warm-up
        runs = [hf_generate(model, enc, prompts, max_tokens, batch) for _ in range(args.repeats)]
        rows.append(row(name, f"HF generate, batch {batch}", *min(runs, key=lambda r: r[0])))
    reference = [text for text, _ in next(r for r in rows if r["how"] == "HF generate, batch 1")["results"]]
    for r in rows:
        r["same_as_hf"] = f"{sum(t == ref for (t, _), ref in zip(r.pop('results'), reference))}/{n}"
    return rows


def row(model: str, how: str, seconds: float, results: list) -> dict:
    tokens = sum(t for _, t in results)
    return {"model": model, "how": how, "requests": len(results), "seconds": round(seconds, 2),
            "requests_per_sec": round(len(results) / seconds, 2), "tokens_per_sec": round(tokens / seconds, 1),
            "tokens": tokens, "results": results}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    import torch
    import transformers

    from gpt2_jax.model import GPT2Config, init_params

    transformers.utils.logging.disable_progress_bar()
    rows = []
    for i, name in enumerate(args.models):
        config = GPT2Config.from_preset(name)
        params = init_params(config, jax.random.key(args.seed))
        for r in measure(name, config, params, args, args.requests[i], args.max_tokens[i]):
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    env = {"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    print(f"greedy completions ({env['cpus']} CPUs, jax {env['jax']}, torch {env['torch']} with "
          f"{env['torch_threads']} threads, {env['date']})")  # fmt: skip
    header = f"{'model':<6}{'how':<30}{'requests':>9}{'req/s':>8}{'tokens/s':>10}  same text as HF batch 1"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['model']:<6}{r['how']:<30}{r['requests']:>9}{r['requests_per_sec']:>8.2f}"
              f"{r['tokens_per_sec']:>10.1f}  {r['same_as_hf']}")  # fmt: skip
    for r in rows:
        print(json.dumps(r))
    print(json.dumps({"bench": "serve", **env, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
