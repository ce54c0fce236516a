"""Measures prepare throughput (MB/s of input text) and loader throughput (tokens/s per host).

    python scripts/bench_data.py [--copies 10] [--workers 1 2] [--tokens 100_000_000]
                                 [--block_size 1024] [--batch 64 512] [--batches 200]

prepare: the bundled Shakespeare (5.06 MB) written out --copies times (numbered, so documents
differ) and tokenized by `python -m gpt2_jax.prepare` in a subprocess, timed end to end.
loader: a random shard of --tokens tokens, `make_train_iterator` for one host; the time of
--batches next() calls after 5 warm-up batches. Prints one JSON line per measurement.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

from gpt2_jax.data import corpus, shards
from gpt2_jax.data import loader as data


def write_texts(folder: str, copies: int) -> int:
    """The corpus, `copies` times, as text files; returns the bytes written."""
    with tarfile.open(fileobj=io.BytesIO(corpus._asset_bytes()), mode="r:xz") as tar:
        texts = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    total = 0
    for c in range(copies):
        for name, text in texts:
            body = f"copy {c}\n".encode() + text
            with open(os.path.join(folder, f"{c:03d}_{name}"), "wb") as f:
                f.write(body)
            total += len(body)
    return total


def bench_prepare(tmp: str, copies: int, workers: int) -> dict:
    src = os.path.join(tmp, "texts")
    os.makedirs(src, exist_ok=True)
    n_bytes = write_texts(src, copies)
    out = os.path.join(tmp, f"out_w{workers}")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "gpt2_jax.prepare", "--input", src, "--out", out, "--workers", str(workers), "--overwrite"]
    subprocess.run(cmd, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    tokens = sum(json.load(open(os.path.join(out, "meta.json")))[s]["tokens"] for s in ("train", "val"))
    return {"bench": "prepare", "workers": workers, "input_mb": round(n_bytes / 1e6, 1), "tokens": tokens,
            "seconds": round(seconds, 2), "mb_per_sec": round(n_bytes / 1e6 / seconds, 1)}  # fmt: skip


def bench_loader(tmp: str, n_tokens: int, block_size: int, batch: int, batches: int) -> dict:
    path = os.path.join(tmp, "shards")
    if not os.path.exists(path):
        os.makedirs(path)
        tokens = np.random.default_rng(0).integers(0, 50257, size=n_tokens, dtype=np.uint16)
        with open(os.path.join(path, "train_000000.bin"), "wb") as f:
            f.write(shards.shard_header(n_tokens) + tokens.tobytes())
    it = data.make_train_iterator(path, block_size=block_size, global_batch_size=batch, seed=0,
                                  process_index=0, process_count=1)  # fmt: skip
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    rate = batches * batch * block_size / seconds
    return {"bench": "loader", "block_size": block_size, "host_batch": batch, "batches": batches,
            "seconds": round(seconds, 3), "tokens_per_sec": round(rate), "m_tokens_per_sec": round(rate / 1e6, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 512])
    p.add_argument("--batches", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for workers in dict.fromkeys(args.workers):
            print(json.dumps(bench_prepare(tmp, args.copies, workers)), flush=True)
        for batch in args.batch:
            print(json.dumps(bench_loader(tmp, args.tokens, args.block_size, batch, args.batches)), flush=True)


if __name__ == "__main__":
    main()
