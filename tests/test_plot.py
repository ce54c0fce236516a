"""The plot CLI: loss curves of several workdirs into one PNG; clear errors."""

import json

import matplotlib.image
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
