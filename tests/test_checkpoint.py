"""Checkpoints: round trip onto another mesh, skipping damaged steps, keep-N, one written by the flat layout; the workdir lock."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2_jax.interop.checkpoint import (
    CheckpointError,
    Checkpoints,
    abstract_with_shardings,
)
from gpt2_jax.model import GPT2Config
from gpt2_jax.train.lock import WorkdirBusy, WorkdirLock

TINY = GPT2Config.from_preset("tiny", dtype="bfloat16")


def _mesh(n):
    return jax.make_mesh((n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def _state(mesh, offset=0.0):
    w = jnp.arange(64.0).reshape(16, 4) + offset
    return {"w": jax.device_put(w, NamedSharding(mesh, P("d"))), "step": jnp.array(int(offset), jnp.int32)}


def _target(mesh):
    spec = P(None, "d") if mesh.devices.size <= 4 else P("d")  # a layout other than the saved one
    shardings = {"w": NamedSharding(mesh, spec), "step": NamedSharding(mesh, P())}
    return abstract_with_shardings(jax.eval_shape(lambda: _state(mesh)), shardings)


def _truncate_state_files(ckpt_dir):
    for root, _, files in os.walk(os.path.join(ckpt_dir, "state")):
        for f in files:
            if f.startswith("manifest") or os.sep + "d" in root:
                open(os.path.join(root, f), "wb").close()


def test_round_trip_onto_a_smaller_mesh(tmp_path):
    ckpts = Checkpoints(str(tmp_path))
    ckpts.save(7, _state(_mesh(8), 7.0), {"next_batch": 5, "seed": 1}, {"lr": 0.001}, TINY)
    ckpts.close()
    restored = Checkpoints(str(tmp_path)).restore_latest(_target(_mesh(4)))
    assert restored.step == 7 and restored.data_state == {"next_batch": 5, "seed": 1}
    assert restored.config == {"lr": 0.001}
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.arange(64.0).reshape(16, 4) + 7)
    assert restored.state["w"].sharding.mesh.devices.size == 4
    assert restored.state["w"].sharding.spec == P(None, "d")


def test_params_and_model_config_restore_alone(tmp_path):
    mesh = _mesh(8)
    state = {"params": _state(mesh, 3.0), "opt_state": {"mu": jnp.zeros(7)}}
    ckpts = Checkpoints(str(tmp_path))
    ckpts.save(3, state, {"next_batch": 3}, {}, TINY)
    ckpts.close()
    ckpts = Checkpoints(str(tmp_path))
    assert ckpts.model_config(3) == TINY
    assert ckpts.model_config(3, dtype="float32").dtype == "float32"
    params = ckpts.restore_params(3, _target(_mesh(4)))
    assert set(params) == {"w", "step"} and params["w"].sharding.mesh.devices.size == 4
    np.testing.assert_array_equal(np.asarray(params["w"]), np.arange(64.0).reshape(16, 4) + 3)


def test_keeps_the_newest_n(tmp_path):
    ckpts = Checkpoints(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        ckpts.save(step, _state(_mesh(8), step), {"next_batch": step}, {}, TINY)
    ckpts.close()
    assert Checkpoints(str(tmp_path)).steps() == [2, 3]


def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    ckpts = Checkpoints(str(tmp_path))
    ckpts.save(10, _state(_mesh(8), 10.0), {"next_batch": 10}, {}, TINY)
    ckpts.save(20, _state(_mesh(8), 20.0), {"next_batch": 20}, {}, TINY)
    ckpts.close()
    _truncate_state_files(ckpts.path(20))
    with caplog.at_level(logging.WARNING, logger="gpt2_jax.interop.checkpoint"):
        restored = Checkpoints(str(tmp_path)).restore_latest(_target(_mesh(8)))
    assert restored.step == 10 and restored.data_state == {"next_batch": 10}
    assert any(ckpts.path(20) in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    ckpts = Checkpoints(str(tmp_path))
    ckpts.save(5, _state(_mesh(8)), {"next_batch": 5}, {}, TINY)
    ckpts.close()
    _truncate_state_files(ckpts.path(5))
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        Checkpoints(str(tmp_path)).restore_latest(_target(_mesh(8)))
    assert Checkpoints(str(tmp_path / "empty")).restore_latest(_target(_mesh(8))) is None


def test_a_half_written_checkpoint_is_not_listed(tmp_path):
    ckpts = Checkpoints(str(tmp_path))
    ckpts.save(3, _state(_mesh(8)), {"next_batch": 3}, {}, TINY)
    ckpts.close()
    # what a run killed mid-write leaves: Orbax's temporary folder, never renamed into place
    os.makedirs(os.path.join(ckpts.directory, "4.orbax-checkpoint-tmp-1234", "state"))
    assert Checkpoints(str(tmp_path)).steps() == [3]


def test_workdir_lock_refuses_a_second_holder_and_frees_on_death(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
            WorkdirLock(str(tmp_path)).acquire()
    # a process that dies holding the lock (SIGKILL: no cleanup) does not leave it stuck
    code = "import os, sys; from gpt2_jax.train.lock import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    with WorkdirLock(str(tmp_path)):
        pass


def test_the_same_error_from_every_checkpoint_is_named_once_with_both_readings(tmp_path):
    ckpts = Checkpoints(str(tmp_path))
    for step in (3, 6):
        ckpts.save(step, _state(_mesh(8), step), {"next_batch": step}, {}, TINY)
    ckpts.close()

    def fails(step):
        raise TypeError("the sharding on the input must be a NamedSharding")

    with pytest.raises(CheckpointError) as e:
        Checkpoints(str(tmp_path)).newest_usable(fails)
    message = str(e.value)
    assert message.startswith(f"no usable checkpoint in {tmp_path}/checkpoints: 6, 3 all fail the same way "
                              "(TypeError: the sharding on the input must be a NamedSharding). Move the folder away")  # fmt: skip
    assert message.endswith("can also mean a problem of this program or its settings rather than of the files")
    assert message.count("NamedSharding") == 1 and "\n" not in message


FIXTURE = Path(__file__).parent / "fixtures" / "pre_restructure"
FIXTURE_SETTINGS = {"model.n_layer": 1, "model.n_embd": 16, "model.n_head": 2, "model.block_size": 16,
                    "model.n_positions": 32, "model.vocab_pad_multiple": 1, "batch_size": 4, "total_steps": 2,
                    "warmup_steps": 1, "checkpoint_every": 2, "keep_checkpoints": 1}  # fmt: skip


def test_a_checkpoint_written_by_the_flat_layout_restores(tmp_path):
    """tests/fixtures/pre_restructure was written by the code before the move into subpackages
    (a micro model trained 2 steps): its parameters load bit for bit, and resuming it to step 4
    gives the losses that the old code's own resume gave."""
    from runs import cli

    from gpt2_jax.interop.load import load_workdir

    saved = np.load(FIXTURE / "params_step2.npz")
    params = load_workdir(str(FIXTURE / "run")).params
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}  # fmt: skip
    assert sorted(flat) == sorted(saved.files)
    for name in saved.files:
        assert np.array_equal(flat[name], saved[name]), name

    expected = json.loads((FIXTURE / "resumed_to_4.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    settings = {**FIXTURE_SETTINGS, **expected["overrides"], "model.vocab_size": 512, "data.path": FIXTURE / "data",
                "data.bundled": "", "eval_every": 0, "log_every": 1, "progress_bar": False, "sample.length": 0}
    resumed = cli("--config", "configs/tiny.py", "--workdir", run, *(f"--config.{k}={v}" for k, v in settings.items()))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run}/checkpoints/2" in resumed.stdout
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}  # fmt: skip
    assert sorted(losses) == [1, 2, 3, 4]
    assert [losses[s] for s in (3, 4)] == pytest.approx([expected["losses"][s] for s in ("3", "4")], rel=1e-6)
