"""CLI: training and validation loss (and learning rate) against tokens, for one or more runs.

    python -m gpt2_jax.plot runs/scratch runs/finetune --out curves.png

Reads each WORKDIR/metrics.jsonl; writes one PNG with a loss panel and a learning-rate panel.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from gpt2_jax.cli import ArgumentParser, run
from gpt2_jax.errors import UserError


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of WORKDIR/metrics.jsonl; eval rows get `tokens` from the
    training rows' tokens per step when they lack it."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{workdir} has no metrics.jsonl (is it a training workdir?)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):  # a run killed mid-write may leave a partial last line
                    raise UserError(f"{path}:{n} is not JSON") from None
    train = [r for r in rows if "loss" in r and "step" in r]
    evals = [r for r in rows if "val_loss" in r and "step" in r]
    per_step = next((r["tokens"] / r["step"] for r in train if r.get("tokens") and r["step"]), None)
    for r in evals:
        if "tokens" not in r and per_step is not None:
            r["tokens"] = r["step"] * per_step
    if not train and not evals:
        raise UserError(f"{path} has no training or eval rows yet")
    return train, evals


def _x(rows: list[dict]) -> tuple[list[float], str]:
    if rows and all("tokens" in r for r in rows):
        return [r["tokens"] for r in rows], "tokens"
    return [r["step"] for r in rows], "step"


def plot(workdirs: Sequence[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    runs = [(w, *read_metrics(w)) for w in workdirs]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 1))
    for i, (workdir, train, evals) in enumerate(runs):
        color, name = f"C{i}", os.path.basename(os.path.normpath(workdir))
        x, xlabel = _x(train)
        if train:
            ax_loss.plot(x, [r["loss"] for r in train], color=color, alpha=0.6, lw=1, label=f"{name} train")
            ax_lr.plot(x, [r.get("lr", float("nan")) for r in train], color=color, lw=1, label=name)
        if evals:
            ex, xlabel = _x(evals)
            ax_loss.plot(ex, [r["val_loss"] for r in evals], "o-", color=color, ms=4, lw=2, label=f"{name} val")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel(xlabel)
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m gpt2_jax.plot", description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    p.add_argument("--out", default="curves.png", help="PNG file to write (default: curves.png)")
    args = p.parse_args(argv)
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out} must end in .png")
    if os.path.dirname(args.out) and not os.path.isdir(os.path.dirname(args.out)):
        raise UserError(f"folder of --out {args.out} does not exist")
    plot(args.workdirs, args.out)
    print(f"wrote {args.out}")
    return 0


def cli() -> int:
    """`python -m gpt2_jax.plot`: main() with user errors as one line and exit status 2."""
    return run(main)
