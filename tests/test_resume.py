"""Fault tolerance of the trainer: bit-exact resume after SIGKILL (also mid-save), resume on another
device count, damaged checkpoints, SIGTERM/SIGINT, non-finite steps, one trainer per workdir,
init_from another workdir."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from runs import cli, rows, tiny

from gpt2_jax.interop.checkpoint import Checkpoints
from gpt2_jax.interop.load import load_workdir
from gpt2_jax.parallel import sharding
from gpt2_jax.train import cli as train
from gpt2_jax.train import faults, optim
from gpt2_jax.train import plan as plan_lib
from gpt2_jax.train.lock import WorkdirLock
from gpt2_jax.train.preemption import StopRequest
from gpt2_jax.train.trainer import Trainer

SETTINGS = {
    "data.path": None, "data.bundled": "", "model.vocab_size": 512, "model.block_size": 32, "batch_size": 16,
    "total_steps": 12, "warmup_steps": 2, "eval_every": 0, "checkpoint_every": 4, "log_every": 1,
    "progress_bar": False, "sample.length": 0,
}  # fmt: skip


def _args(shards, workdir, **overrides):
    settings = {**SETTINGS, "data.path": shards, **overrides}
    return ["--config", "configs/tiny.py", "--workdir", str(workdir), *(f"--config.{k}={v}" for k, v in settings.items())]


def _steps(workdir):
    return Checkpoints(str(workdir), create=False).steps()


def _params(workdir, step):
    return jax.tree_util.tree_map(np.asarray, load_workdir(str(workdir), step).params)


def _assert_bit_identical(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def _losses_by_step(workdir):
    """The loss of each step (the last row of a step, were there several)."""
    train_rows, _ = rows(workdir)
    return {r["step"]: r["loss"] for r in train_rows}


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory):
    """12 uninterrupted steps on 8 devices, checkpoints at 4, 8, 12."""
    workdir = tmp_path_factory.mktemp("baseline")
    run = cli(*_args(shards, workdir), devices=8)
    assert run.returncode == 0, run.stderr
    assert _steps(workdir) == [4, 8, 12]
    return workdir


def test_sigkill_after_a_checkpoint_and_during_a_save_then_resume_is_bit_exact(shards, baseline, tmp_path):
    workdir = tmp_path / "run"
    killed = cli(*_args(shards, workdir), devices=8, env={"GPT2_JAX_FAULT": "sigkill_at:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _steps(workdir) == [4]

    killed_saving = cli(*_args(shards, workdir), devices=8, env={"GPT2_JAX_FAULT": "sigkill_saving:8"})
    assert killed_saving.returncode == -signal.SIGKILL, killed_saving.stderr
    assert f"resuming from {workdir}/checkpoints/4" in killed_saving.stdout
    assert _steps(workdir) == [4]  # step 8 was being written: it never became a checkpoint

    resumed = cli(*_args(shards, workdir), devices=8)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {workdir}/checkpoints/4" in resumed.stdout
    assert _steps(workdir) == [4, 8, 12]
    _assert_bit_identical(_params(workdir, 12), _params(baseline, 12))
    assert _losses_by_step(workdir) == _losses_by_step(baseline)  # the same batches, in the same order
    train_rows, _ = rows(workdir)  # rows the killed runs logged after their checkpoint were dropped
    assert [r["step"] for r in train_rows] == list(range(1, 13))


def test_resume_on_4_then_8_devices_continues_with_the_same_batches(shards, baseline, tmp_path):
    workdir = tmp_path / "run"
    on_8 = cli(*_args(shards, workdir), devices=8, env={"GPT2_JAX_FAULT": "sigterm_at:3"})
    assert on_8.returncode == 128 + signal.SIGTERM, on_8.stderr
    assert on_8.stderr.strip().endswith(f"stopped by SIGTERM after step 4; checkpoint {workdir}/checkpoints/4 "
                                        "saved. Run the same command to continue")  # fmt: skip
    on_4 = cli(*_args(shards, workdir), devices=4, env={"GPT2_JAX_FAULT": "sigterm_at:7"})
    assert on_4.returncode == 128 + signal.SIGTERM, on_4.stderr
    assert "on 4 cpu device(s)" in on_4.stdout
    back_on_8 = cli(*_args(shards, workdir), devices=8)
    assert back_on_8.returncode == 0, back_on_8.stderr
    assert _steps(workdir) == [4, 8, 12]

    got, want = _losses_by_step(workdir), _losses_by_step(baseline)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)], rtol=2e-5)
    for step in (4, 8):  # each checkpoint holds the data position: the next batch is step + 1's
        with open(workdir / "checkpoints" / str(step) / "data" / "metadata") as f:
            assert json.load(f)["next_batch"] == step


def _damage(checkpoint_dir):
    """Truncate every file of the checkpoint's train state, as a disk that filled up would."""
    for root, _, files in os.walk(os.path.join(checkpoint_dir, "state")):
        for f in files:
            open(os.path.join(root, f), "wb").close()


def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(shards, baseline, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    _damage(workdir / "checkpoints" / "12")
    args = _args(shards, workdir, init_from=f"workdir:{baseline}")
    assert train.main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert f"warning: checkpoint {workdir}/checkpoints/12 is unusable, skipped it: " in out
    assert f"resuming from {workdir}/checkpoints/8 (init_from 'workdir:{baseline}' is not used)" in out
    assert os.path.isdir(workdir / "checkpoints" / "12.unusable")  # kept for inspection, out of the way
    assert _steps(workdir) == [4, 8, 12]
    _assert_bit_identical(_params(workdir, 12), _params(baseline, 12))


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(shards, baseline, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    for step in (4, 8, 12):
        _damage(workdir / "checkpoints" / str(step))
    assert train.main(["train", *_args(shards, workdir)]) == 2
    err = capsys.readouterr().err.strip()
    # the three are damaged alike, so they fail alike: named once, with both readings
    assert err.startswith(f"error: no usable checkpoint in {workdir}/checkpoints: 12, 8, 4 all fail the same way (")
    assert len(err.splitlines()) == 1
    assert "Move the folder away to start afresh" in err and "or its settings rather than of the files" in err


def test_a_checkpoint_of_another_model_is_refused(shards, baseline, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    assert train.main(["train", *_args(shards, workdir, **{"model.n_layer": 3})]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {workdir}/checkpoints holds checkpoints of another model: n_layer 2 "
                          "(checkpoint) vs 3 (config)")  # fmt: skip


def test_a_changed_data_order_is_refused(shards, baseline, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    assert train.main(["train", *_args(shards, workdir, seed=1, total_steps=14)]) == 2
    assert "error: cannot resume the data order, it changed since the checkpoint: seed 0 -> 1" in capsys.readouterr().err


def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(faults._FAULTS, "nan_update_at", {6})
    assert train.main(["train", *_args(shards, tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: step 6: loss {_losses_by_step(tmp_path)[6]:.4g}, non-finite update (not applied); "
                   f"stopping: the last good checkpoint, {tmp_path}/checkpoints/4, is kept. Lower lr, raise "
                   "warmup_steps, or set max_bad_steps=N to skip up to N such steps")  # fmt: skip
    assert _steps(tmp_path) == [4]


def test_a_diverging_run_stops_at_its_first_nan_loss(shards, tmp_path, capsys):
    assert train.main(["train", *_args(shards, tmp_path, lr=1e30, warmup_steps=0)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: step 2: loss nan, non-finite update (not applied); stopping: no checkpoint was saved")
    assert _steps(tmp_path) == []


def test_max_bad_steps_skips_non_finite_updates(shards, baseline, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(faults._FAULTS, "nan_update_at", {6})
    assert train.main(["train", *_args(shards, tmp_path, max_bad_steps=1)]) == 0
    assert "warning: step 6: loss " in capsys.readouterr().out
    train_rows, _ = rows(tmp_path)
    assert [r.get("skipped_steps", 0) for r in train_rows] == [0] * 5 + [1] * 7
    got, want = _losses_by_step(tmp_path), _losses_by_step(baseline)
    assert [got[s] for s in range(1, 7)] == pytest.approx([want[s] for s in range(1, 7)], rel=2e-5)
    assert got[7] != pytest.approx(want[7], rel=1e-4)  # step 6's update was left out


def test_the_logged_lr_is_the_one_applied_after_a_skipped_step(shards, baseline, tmp_path, monkeypatch):
    """The optimizer's schedule does not advance on a left-out update, so after step 6 is
    skipped step 7 applies step 6's learning rate (and so on): the rows say so."""
    monkeypatch.setitem(faults._FAULTS, "nan_update_at", {6})
    assert train.main(["train", *_args(shards, tmp_path, max_bad_steps=1, warmup_steps=10)]) == 0
    lr = {r["step"]: r["lr"] for r in rows(tmp_path)[0]}
    schedule = optim.lr_schedule(3e-3, 12, 10, 0.1)  # configs/tiny.py's lr, this run's steps and warmup
    applied = [float(schedule(n)) for n in [*range(0, 6), *range(5, 11)]]  # update counts 0..5, then 5..10
    assert applied[6] != pytest.approx(float(schedule(6)))  # in warmup a wrong count shows
    assert [lr[s] for s in range(1, 13)] == pytest.approx(applied, rel=1e-6)


def test_a_second_trainer_on_the_same_workdir_is_refused(shards, tmp_path, capsys):
    with WorkdirLock(str(tmp_path)):
        assert train.main(["train", *_args(shards, tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path} is in use by pid {os.getpid()} on ") and len(err.splitlines()) == 1
    assert _steps(tmp_path) == []


def test_stop_request_turns_the_first_signal_into_a_flag():
    with StopRequest() as stop:
        assert stop.agreed(sync=True) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed(sync=False) == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # after a first signal, Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed(sync=False) == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_init_from_a_workdir_starts_from_its_newest_parameters(shards, baseline):
    c = tiny(shards, init_from=f"workdir:{baseline}")
    p = plan_lib.plan(c)
    assert p.init_workdir == str(baseline)
    with sharding.use_mesh(p.mesh, p.rules):
        state = Trainer(c, p).initial_state()
    assert int(state.step) == 0
    _assert_bit_identical(jax.tree_util.tree_map(np.asarray, state.params), _params(baseline, 12))


def test_init_from_a_workdir_with_other_vocabulary_padding_pads_with_zero_rows(shards, baseline):
    c = tiny(shards, init_from=f"workdir:{baseline}", **{"model.vocab_pad_multiple": 384})  # 512 -> 768 rows
    p = plan_lib.plan(c)
    with sharding.use_mesh(p.mesh, p.rules):
        params = jax.tree_util.tree_map(np.asarray, Trainer(c, p).initial_state().params)
    saved = _params(baseline, 12)
    assert params["wte"].shape == (768, saved["wte"].shape[1]) and saved["wte"].shape[0] == 512
    np.testing.assert_array_equal(params["wte"][:512], saved["wte"])
    assert not params["wte"][512:].any()
    _assert_bit_identical({k: v for k, v in params.items() if k != "wte"}, {k: v for k, v in saved.items() if k != "wte"})
