"""CLI: training and validation loss (and learning rate) against tokens, for one or more runs.

    python -m gpt2_jax.plot runs/scratch runs/finetune --out curves.png

Reads each WORKDIR/metrics.jsonl; writes one PNG with a loss panel (log scale; the training loss
smoothed by an EMA, the raw curve faint behind it) and a learning-rate panel, against tokens
labelled 1M, 10M, ...
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from gpt2_jax.cli import ArgumentParser, run
from gpt2_jax.errors import UserError
from gpt2_jax.interop import paths

SMOOTHING = 0.9  # EMA weight for the training loss (0 = raw curve only)


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of WORKDIR/metrics.jsonl; eval rows get `tokens` from the
    training rows' tokens per step when they lack it."""
    path = paths.join(workdir, "metrics.jsonl")  # local or gs://
    if not paths.isfile(path):
        raise UserError(f"{workdir} has no metrics.jsonl (is it a training workdir?)")
    rows = []
    for n, line in enumerate(paths.read_text(path).splitlines(keepends=True), 1):
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


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average: s[0] = v[0], s[i] = weight * s[i-1] + (1 - weight) * v[i]."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else weight * out[-1] + (1 - weight) * v)
    return out


def smoothing_for(n: int, weight: float = SMOOTHING) -> float:
    """`weight`, lowered for short runs: its window (about 1 / (1 - weight) points) stays within a
    tenth of the `n` points, so a 20-row run is not flattened into a lagging line."""
    return max(0.0, min(weight, 1 - 10 / n)) if n else 0.0


def si(x: float, pos=None) -> str:
    """A tick label with an SI-style suffix, as token counts are written: 1000 -> '1k', 2.5e6 ->
    '2.5M', 1e10 -> '10B'."""
    x = float(f"{x:.3g}")  # round first, so 999,999 is '1M', not '1e+03k'
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:g}"


def lr_label(y: float, pos=None) -> str:
    """A learning-rate tick as configs write it: 6e-4 -> '6e-4', 2.5e-4 -> '2.5e-4', 0 -> '0'."""
    if y == 0 or abs(y) >= 0.01:
        return f"{y:g}"
    mantissa, exponent = f"{y:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _loss_axis(ax) -> None:
    """Log scale with plain numbers (2, 3, 5, 10) as labels: losses span less than a decade, where
    matplotlib's log labels would show one tick or none."""
    from matplotlib import ticker

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, pos: f"{y:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel("loss (nats/token, log scale)")
    ax.grid(alpha=0.3, which="major")


def figure(workdirs: Sequence[str], smoothing: float = SMOOTHING):
    """The matplotlib Figure: axes[0] the loss panel, axes[1] the learning rate."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    runs = [(w, *read_metrics(w)) for w in workdirs]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 1))
    for i, (workdir, train, evals) in enumerate(runs):
        local = not paths.is_remote(workdir)
        color, name = f"C{i}", paths.basename(os.path.normpath(workdir) if local else workdir)
        x, xlabel = _x(train)
        if train:
            loss = [r["loss"] for r in train]
            ax_loss.plot(x, loss, color=color, alpha=0.25, lw=1)  # raw, faint: the noise stays visible
            ax_loss.plot(x, ema(loss, smoothing_for(len(loss), smoothing)), color=color, lw=1.5,
                         label=f"{name} train (smoothed)")  # fmt: skip
            ax_lr.plot(x, [r.get("lr", float("nan")) for r in train], color=color, lw=1, label=name)
        if evals:
            ex, xlabel = _x(evals)
            ax_loss.plot(ex, [r["val_loss"] for r in evals], "o-", color=color, ms=4, lw=2, label=f"{name} val")
    _loss_axis(ax_loss)
    ax_loss.legend()
    ax_lr.set_ylabel("learning rate")
    ax_lr.yaxis.set_major_formatter(ticker.FuncFormatter(lr_label))
    ax_lr.set_xlabel(xlabel)
    ax_lr.grid(alpha=0.3)
    if xlabel == "tokens":
        ax_lr.xaxis.set_major_formatter(ticker.FuncFormatter(si))
    fig.tight_layout()
    return fig


def plot(workdirs: Sequence[str], out: str, smoothing: float = SMOOTHING) -> None:
    import matplotlib.pyplot as plt

    fig = figure(workdirs, smoothing)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m gpt2_jax.plot", description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    p.add_argument("--out", default="curves.png", help="PNG file to write (default: curves.png)")
    p.add_argument("--smoothing", type=float, default=SMOOTHING,
                   help=f"EMA weight in [0, 1) for the training loss, lowered for short runs (default: {SMOOTHING})")
    args = p.parse_args(argv)
    if not 0 <= args.smoothing < 1:
        raise UserError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out} must end in .png")
    if os.path.dirname(args.out) and not os.path.isdir(os.path.dirname(args.out)):
        raise UserError(f"folder of --out {args.out} does not exist")
    plot(args.workdirs, args.out, args.smoothing)
    print(f"wrote {args.out}")
    return 0


def cli() -> int:
    """`python -m gpt2_jax.plot`: main() with user errors as one line and exit status 2."""
    return run(main)
