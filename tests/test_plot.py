"""The plot CLI: loss curves of several workdirs into one PNG; clear errors."""

import json

import matplotlib.image
import numpy as np
import pytest

from gpt2_jax.cli import run
from gpt2_jax.tools import plot


def _workdir(path, steps=20, final_val=3.0, partial_last_line=False):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 10.0 / s, "lr": 1e-3 * s / steps, "tokens": s * 512,
                                "tokens_per_sec": 1e4}) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "val_loss": final_val + 10.0 / s, "val_ppl": 1.0}) + "\n")
        if partial_last_line:
            f.write('{"step": 21, "lo')
    return str(path)


def test_reads_rows_and_gives_eval_rows_tokens(tmp_path):
    train, evals = plot.read_metrics(_workdir(tmp_path / "a", partial_last_line=True))
    assert len(train) == 20 and [r["step"] for r in evals] == [10, 20]
    assert [r["tokens"] for r in evals] == [5120, 10240]


def test_plots_several_runs_to_a_png(tmp_path, capsys):
    a, b = _workdir(tmp_path / "scratch"), _workdir(tmp_path / "finetune", final_val=2.0)
    out = tmp_path / "curves.png"
    assert run(plot.main, [a, b, "--out", str(out)]) == 0
    image = matplotlib.image.imread(str(out))
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    assert capsys.readouterr().out.strip() == f"wrote {out}"


@pytest.mark.parametrize("setup, args, message", [
    ("none", ["WD"], "has no metrics.jsonl"),
    ("bad", ["WD"], "metrics.jsonl:1 is not JSON"),
    ("ok", ["WD", "--out", "curves.pdf"], "must end in .png"),
    ("ok", ["WD", "--out", "missing/dir/c.png"], "does not exist"),
])
def test_user_errors(setup, args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wd = tmp_path / "wd"
    if setup == "ok":
        _workdir(wd)
    elif setup == "bad":
        wd.mkdir()
        (wd / "metrics.jsonl").write_text("not json\n")
    assert run(plot.main, [str(wd) if a == "WD" else a for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


# --- read at a glance: log-scale loss, token ticks 1M / 10M, smoothed training loss -----------


def _noisy_workdir(path, steps=200, tokens_per_step=50_000):
    """Loss 3 + 5/sqrt(s), +-0.3 alternating: the zig-zag a small batch gives."""
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            loss = 3.0 + 5.0 / s**0.5 + (0.3 if s % 2 else -0.3)
            f.write(json.dumps({"step": s, "loss": loss, "lr": 1e-3, "tokens": s * tokens_per_step}) + "\n")
    return str(path)


def test_ema_is_the_exponential_moving_average_from_the_first_value():
    assert plot.ema([1.0, 3.0, 3.0, 7.0], 0.5) == [1.0, 2.0, 2.5, 4.75]
    assert plot.ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    # short runs get less smoothing: the EMA's window stays within a tenth of the points
    assert plot.smoothing_for(1000) == 0.9 and plot.smoothing_for(50) == pytest.approx(0.8)
    assert plot.smoothing_for(8) == 0.0


@pytest.mark.parametrize("x, label", [(0, "0"), (512, "512"), (1e3, "1k"), (2.5e5, "250k"), (1e6, "1M"),
                                      (1.5e6, "1.5M"), (1e7, "10M"), (999_999, "1M"), (2e10, "20B")])
def test_token_ticks_have_si_suffixes(x, label):
    assert plot.si(x) == label


def test_loss_is_on_a_log_scale_against_tokens_with_the_smoothed_curve_over_the_raw(tmp_path):
    import matplotlib.pyplot as plt

    fig = plot.figure([_noisy_workdir(tmp_path / "run")])
    ax_loss, ax_lr = fig.axes
    assert ax_loss.get_yscale() == "log" and ax_lr.get_xlabel() == "tokens"
    tick = ax_lr.xaxis.get_major_formatter()
    assert (tick(1e6, 0), tick(1e7, 0)) == ("1M", "10M")
    raw, smoothed = ax_loss.get_lines()
    assert raw.get_alpha() < 0.5 and smoothed.get_label() == "run train (smoothed)"
    assert list(raw.get_xdata()[:2]) == [50_000, 100_000]
    expected = plot.ema(list(raw.get_ydata()), 0.9)
    np.testing.assert_allclose(smoothed.get_ydata(), expected)
    # the zig-zag is gone from the smoothed curve: its steps are far smaller than the raw ones
    assert np.abs(np.diff(smoothed.get_ydata()[100:])).max() < 0.1 < np.abs(np.diff(raw.get_ydata()[100:])).min()
    plt.close(fig)


def test_smoothing_flag_is_checked(tmp_path, capsys):
    assert run(plot.main, [_noisy_workdir(tmp_path / "run"), "--smoothing", "1", "--out", str(tmp_path / "c.png")]) == 2
    assert "--smoothing must be in [0, 1)" in capsys.readouterr().err
