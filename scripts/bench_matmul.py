"""Bare float32 matmuls, jitted JAX (XLA:CPU) vs torch, at the shapes of a GPT-2 124M step.

    python scripts/bench_matmul.py [--repeats 10]

Each line: M x K x N, GFLOP/s of both, and the ratio (JAX / torch); torch gets as many threads
as this process may use. Shows whether a gap between whole train steps is the matmuls.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = [(1024, 768, 3072), (1024, 3072, 768), (1024, 768, 50304), (4096, 256, 1024)]


def _seconds(call, repeats: int) -> float:
    call()  # compile / warm up
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    matmul = jax.jit(jnp.matmul)
    for m, k, n in SHAPES:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        jax_s = _seconds(lambda: matmul(ja, jb).block_until_ready(), args.repeats)
        torch_s = _seconds(lambda: torch.matmul(ta, tb), args.repeats)
        flops = 2 * m * k * n
        print(f"{m}x{k}x{n}: jax {flops / jax_s / 1e9:6.1f} GFLOP/s, torch {flops / torch_s / 1e9:6.1f} GFLOP/s, "
              f"ratio {torch_s / jax_s:.2f}")


if __name__ == "__main__":
    main()
