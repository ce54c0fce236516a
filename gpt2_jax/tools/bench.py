"""CLI: training-step throughput and MFU of the real train step, side by side with HF PyTorch.

    python -m gpt2_jax.bench --config configs/X.py[:ARG] [--config.KEY=VALUE ...] [--steps N] [--warmup N]
                             [--compare torch] [--profile DIR]

Builds the step exactly as `train` does (plan -> Trainer: same model, optimizer, shardings,
donation, grad accumulation) on synthetic tokens (nothing read from disk), runs --warmup steps
(the first compiles), then times --steps steps with the device synchronised at both ends.
Prints a table (implementation, step ms, tokens/s, model TFLOP/s, MFU, peak memory) and, last,
one JSON line with tokens_per_sec, step_ms, mfu (null where the device peak is unknown) and,
with --compare torch, torch_tokens_per_sec and ratio (ours / torch).

--compare torch times transformers' GPT2LMHeadModel of the same dimensions (random init, no
download) on the same batch, sequence length, grad accumulation, dtype policy (bf16 autocast for
dtype=bfloat16), remat (gradient checkpointing) and AdamW hyperparameters, in the same process:
eager on CPU; on CUDA sdpa attention, fused AdamW, both eager and torch.compile (the compiled
one is torch_tokens_per_sec, the headline ratio). FLOPs per token follow gpt2_jax.metrics.

--profile DIR traces one more step with the JAX profiler (a Perfetto trace under DIR, also
readable by TensorBoard's profiler) and prints where it spent its time, by op kind and by op
(gpt2_jax.tools.op_profile).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Sequence

from gpt2_jax.cli import TRAINING_MEMORY_HINT, ArgumentParser, run
from gpt2_jax.errors import UserError


def parse_args(argv: Sequence[str] | None):
    """(ml_collections config, bench options) from the command line."""
    from gpt2_jax.train import cli as train

    p = ArgumentParser(prog="python -m gpt2_jax.bench", description=__doc__.split("\n")[0], allow_abbrev=False,
                       usage="%(prog)s --config NAME|FILE[:ARG] [--config.KEY=VALUE ...] [--steps N] [--warmup N] "
                       "[--compare torch] [--profile DIR]")  # fmt: skip
    p.add_argument("--config", metavar="NAME|FILE[:ARG]", help="required: the config to time, as train takes it (a "
                   "packaged name such as tiny or gpt2_124m, or a file such as configs/tiny.py); --config.KEY=VALUE "
                   "overrides a key (python -m gpt2_jax.train --help lists them)")  # fmt: skip
    p.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="untimed steps first, the first compiles (default %(default)s)")
    p.add_argument("--compare", choices=["torch"], help="also time HF transformers' GPT-2 in PyTorch (default: off)")
    p.add_argument("--profile", metavar="DIR", help="then trace one more step into DIR (jax.profiler, Perfetto "
                   "format) and print the ops that took longest (default: off)")  # fmt: skip
    args, rest = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.warmup < 1:
        raise UserError(f"--warmup must be >= 1 (the first step compiles), got {args.warmup}")
    if "--workdir" in rest or any(a.startswith("--workdir=") for a in rest):
        raise UserError("bench takes no --workdir: it writes nothing")
    try:  # the trainer's own parsing: same config files, overrides and checks
        config_flag = ["--config", args.config] if args.config else []
        config, _ = train.parse_args(["bench", *config_flag, *rest, "--workdir", "unused"])
    except train.UsageError as e:
        raise UserError(str(e)) from None
    return config, args


def _torch_modules():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UserError(f"--compare torch needs PyTorch and transformers ({e.name} is missing): "
                        "pip install torch transformers") from None  # fmt: skip
    return torch, transformers


def synthetic_tokens(c, p, rows: int) -> dict:
    """`rows` random windows of block_size + 1 uint16 tokens -> int32 inputs / targets and float32
    all-ones weights: the keys, dtypes and shapes of the data pipeline's pretraining batches
    (gpt2_jax.data.loader), so the step timed is the one train compiles."""
    import numpy as np

    tokens = np.random.default_rng(c.seed).integers(0, p.model.vocab_size, (rows, p.block_size + 1), dtype=np.uint16)
    tokens = tokens.astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((rows, p.block_size), np.float32)}


def train_batch(c, p, trainer) -> dict:
    """This process's rows of a synthetic global batch, split into microbatches and placed as
    train places the loader's batches (call inside sharding.use_mesh)."""
    from gpt2_jax.data import loader as data_lib
    from gpt2_jax.parallel import sharding
    from gpt2_jax.train import steps

    shape = (p.grad_accum, c.batch_size // p.grad_accum, p.block_size)
    _, count = sharding.process_batch_slice(trainer.train_batch_sharding, shape, batch_dim=1)
    host = synthetic_tokens(c, p, c.batch_size // count)
    return data_lib.to_global_batch(steps.split_microbatches(host, p.grad_accum), trainer.train_batch_sharding)


def _peak_memory(devices) -> int | None:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return None if None in peaks or not peaks else max(peaks)


def time_jax(c, p, steps_: int, warmup: int, profile_dir: str | None = None) -> dict:
    """Compile, warm up and time the trainer's jitted train step; then, with `profile_dir`,
    trace one more step there."""
    import jax

    from gpt2_jax.parallel import sharding
    from gpt2_jax.tools import op_profile
    from gpt2_jax.train.trainer import Trainer

    with sharding.use_mesh(p.mesh, p.rules):
        trainer = Trainer(c, p)
        batch = train_batch(c, p, trainer)
        state = trainer.initial_state()
        start = time.perf_counter()
        state, m = trainer.train_fn(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - start
        for _ in range(warmup - 1):
            state, m = trainer.train_fn(state, batch)
        jax.block_until_ready((state, m))
        start = time.perf_counter()
        for _ in range(steps_):
            state, m = trainer.train_fn(state, batch)  # no host round trip between steps
        jax.block_until_ready((state, m))
        seconds = time.perf_counter() - start
        loss = float(m["loss"].addressable_data(0))
        trace = op_profile.trace(lambda: trainer.train_fn(state, batch), profile_dir) if profile_dir else None
    devices = list(p.mesh.devices.flat)
    return {"step_s": seconds / steps_, "compile_s": compile_s, "loss": loss, "peak_memory": _peak_memory(devices),
            "peak_flops": trainer.peak, "device": f"{len(devices)} x {devices[0].device_kind}", "trace": trace}  # fmt: skip


def time_torch(c, p, steps_: int, warmup: int, compiled: bool) -> dict:
    """The same training step in PyTorch with transformers' GPT2LMHeadModel."""
    torch, transformers = _torch_modules()
    m = p.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(c.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default float32 matmuls on GPU
        torch.backends.cudnn.allow_tf32 = True
    hf_config = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
        layer_norm_epsilon=m.layer_norm_epsilon, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hf_config).to(device).train()
    if m.remat != "none":
        model.gradient_checkpointing_enable()
    decay = [q for q in model.parameters() if q.ndim >= 2]
    no_decay = [q for q in model.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.lr, betas=(c.beta1, c.beta2), eps=c.adam_eps,
                            **({"fused": True} if device == "cuda" else {}))  # fmt: skip
    forward = torch.compile(model) if compiled else model
    host = synthetic_tokens(c, p, c.batch_size)
    A = p.grad_accum
    micro = [(torch.as_tensor(host["inputs"][a::A], dtype=torch.long, device=device),
              torch.as_tensor(host["targets"][a::A], dtype=torch.long, device=device)) for a in range(A)]  # fmt: skip
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=m.dtype == "bfloat16")

    def step():
        for x, y in micro:
            with autocast:
                logits = forward(x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / A).backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps_):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    out = {"step_s": seconds / steps_, "compile_s": compile_s, "loss": float(loss.detach()), "peak_memory": peak,
           "device": f"{device}: {name}", "threads": torch.get_num_threads(), "version": torch.__version__}  # fmt: skip
    del model, forward, opt, micro
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _row(name: str, step_s: float, tokens_per_step: int, flops_token: float, peak_flops, peak_memory) -> dict:
    from gpt2_jax.train import flops

    tps = tokens_per_step / step_s
    return {"implementation": name, "step_ms": 1e3 * step_s, "tokens_per_sec": tps,
            "model_tflops": tps * flops_token / 1e12, "mfu": flops.mfu(tps, flops_token, peak_flops),
            "peak_memory_bytes": peak_memory}  # fmt: skip


def _table(rows: list[dict]) -> str:
    head = f"{'implementation':<26} {'step ms':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7} {'peak mem':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
        lines.append(f"{r['implementation']:<26} {r['step_ms']:>10.1f} {r['tokens_per_sec']:>12,.0f} "
                     f"{r['model_tflops']:>9.3f} {mfu:>7} {mem:>10}")  # fmt: skip
    return "\n".join(lines)


def _profile(trace: str, device: bool) -> str:
    from gpt2_jax.tools import op_profile

    try:
        ops = op_profile.op_times(trace, device)
    except op_profile.NoDeviceEvents as e:
        return f"\nprofile: {e}"
    return (f"\none gpt2_jax step, traced ({trace}):\n{op_profile.table(op_profile.by_kind(ops), 8, 'op kind')}\n\n"
            f"{op_profile.table(ops, 15)}")


def main(argv: Sequence[str] | None = None) -> int:
    c, args = parse_args(argv)
    if args.compare == "torch":
        _torch_modules()  # refuse before compiling anything
        # Let PyTorch have GPU memory too: JAX takes only what it uses instead of 75% up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from gpt2_jax.train import flops
    from gpt2_jax.train.plan import ConfigError, plan

    try:
        p = plan(c, data=False)
    except ConfigError as e:
        raise UserError(str(e)) from None
    tokens_per_step = c.batch_size * p.block_size
    flops_token = flops.flops_per_token(p.model, p.block_size)
    summary = {"device": None, "dtype": p.model.dtype, "n_layer": p.model.n_layer, "n_embd": p.model.n_embd,
               "n_head": p.model.n_head, "block_size": p.block_size, "batch_size": c.batch_size,
               "grad_accum": p.grad_accum, "remat": p.model.remat, "attention": p.model.attention,
               "loss_chunk": p.model.loss_chunk, "vocab_pad_multiple": p.model.vocab_pad_multiple,
               "tokens_per_step": tokens_per_step, "flops_per_token": flops_token, "steps": args.steps,
               "warmup": args.warmup, "jax_version": jax.__version__}  # fmt: skip
    torch_results = {}
    if args.compare == "torch":  # first, so its GPU memory is given back before JAX takes its own
        torch_mod, _ = _torch_modules()
        variants = [("eager", False), ("compiled", True)] if torch_mod.cuda.is_available() else [("eager", False)]
        for name, compiled in variants:
            print(f"timing HF PyTorch ({name}) ...", flush=True)
            torch_results[name] = time_torch(c, p, args.steps, args.warmup, compiled)
    print("timing gpt2_jax ...", flush=True)
    ours = time_jax(c, p, args.steps, args.warmup, args.profile)
    summary["device"] = ours["device"]
    rows = [_row("gpt2_jax", ours["step_s"], tokens_per_step, flops_token, ours["peak_flops"], ours["peak_memory"])]
    torch_flops = flops.flops_per_token(p.model.replace(vocab_pad_multiple=1), p.block_size)  # HF: 50257 columns
    for name, r in torch_results.items():
        rows.append(_row(f"hf_torch_{name}", r["step_s"], tokens_per_step, torch_flops, ours["peak_flops"],
                         r["peak_memory"]))  # fmt: skip
    print(f"{summary['device']}, {p.model.dtype}, {p.model.n_layer} layers x n_embd {p.model.n_embd}, "
          f"batch {c.batch_size} x {p.block_size} tokens (grad_accum {p.grad_accum}), "
          f"{args.steps} timed steps after {args.warmup}; JAX compile + first step {ours['compile_s']:.1f} s")  # fmt: skip
    print(_table(rows))
    out = {**summary, **{k: v for k, v in rows[0].items() if k != "implementation"},
           "compile_s": ours["compile_s"], "loss": ours["loss"]}  # fmt: skip
    if ours["trace"]:
        print(_profile(ours["trace"], device=jax.default_backend() != "cpu"))
        out["profile_trace"] = ours["trace"]
    if torch_results:
        head = "compiled" if "compiled" in torch_results else "eager"
        by_name = {r["implementation"]: r for r in rows}
        headline = by_name[f"hf_torch_{head}"]
        any_torch = next(iter(torch_results.values()))
        out.update(torch_implementation=head, torch_device=any_torch["device"], torch_version=any_torch["version"],
                   torch_threads=any_torch["threads"], torch_tokens_per_sec=headline["tokens_per_sec"],
                   torch_step_ms=headline["step_ms"], torch_mfu=headline["mfu"],
                   torch_peak_memory_bytes=headline["peak_memory_bytes"],
                   ratio=out["tokens_per_sec"] / headline["tokens_per_sec"])  # fmt: skip
        if head == "compiled":
            eager = by_name["hf_torch_eager"]
            out.update(torch_eager_tokens_per_sec=eager["tokens_per_sec"], torch_eager_step_ms=eager["step_ms"],
                       ratio_eager=out["tokens_per_sec"] / eager["tokens_per_sec"])  # fmt: skip
    print(json.dumps(out))
    return 0


def cli() -> int:
    """`python -m gpt2_jax.bench`: main() with user errors as one line and exit status 2."""
    return run(main, memory_hint=TRAINING_MEMORY_HINT)
