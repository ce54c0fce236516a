"""Checkpoints: round trips, damaged steps set aside, transient errors retried, one step for all processes; the lock."""

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

from gpt2_jax.interop import checkpoint
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
        assert np.array_equal(flat[name], saved[name].reshape(flat[name].shape)), name  # c_attn: now head-major

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


def _two_steps(tmp_path, steps=(10, 20)):
    ckpts = Checkpoints(str(tmp_path))
    for step in steps:
        ckpts.save(step, _state(_mesh(8), float(step)), {"next_batch": step}, {}, TINY)
    ckpts.close()
    return ckpts


def _failing_restore(monkeypatch, error, times):
    """Checkpoints.restore raises `error` the first `times` calls (an injected fault), then works."""
    calls = []
    real = Checkpoints.restore

    def restore(self, step, abstract_state):
        calls.append(step)
        if len(calls) <= times:
            raise error
        return real(self, step, abstract_state)

    monkeypatch.setattr(Checkpoints, "restore", restore)
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    return calls


def test_a_transient_restore_error_is_retried_and_sets_nothing_aside(tmp_path, monkeypatch):
    ckpts = _two_steps(tmp_path)
    calls = _failing_restore(monkeypatch, ValueError("UNAVAILABLE: injected HTTP 503 from the store"), times=2)
    restored = Checkpoints(str(tmp_path)).restore_latest(_target(_mesh(8)))
    assert restored.step == 20 and calls == [20, 20, 20]  # retried the same step; not skipped
    assert np.array_equal(np.asarray(restored.state["w"]), np.arange(64.0).reshape(16, 4) + 20)
    assert sorted(os.listdir(ckpts.directory)) == ["10", "20"]


def test_a_persistent_transient_error_fails_the_run_naming_it_and_keeps_every_checkpoint(tmp_path, monkeypatch):
    ckpts = _two_steps(tmp_path)
    calls = _failing_restore(monkeypatch, ValueError("DEADLINE_EXCEEDED: injected timeout"), times=100)
    with pytest.raises(CheckpointError) as e:
        Checkpoints(str(tmp_path)).restore_latest(_target(_mesh(8)))
    assert calls == [20] * (len(checkpoint.RETRY_DELAYS_S) + 1)
    message = str(e.value)
    assert f"could not restore checkpoint {ckpts.path(20)} after 4 tries: ValueError: DEADLINE_EXCEEDED" in message
    assert "no checkpoint was set aside" in message and "\n" not in message
    assert sorted(os.listdir(ckpts.directory)) == ["10", "20"]


def test_an_error_that_is_not_damage_fails_without_setting_anything_aside(tmp_path, monkeypatch):
    ckpts = _two_steps(tmp_path)
    _failing_restore(monkeypatch, MemoryError(), times=100)  # a host out of memory: transient
    with pytest.raises(CheckpointError, match="looks transient"):
        Checkpoints(str(tmp_path)).restore_latest(_target(_mesh(8)))
    _failing_restore(monkeypatch, TypeError("a bug"), times=100)
    with pytest.raises(CheckpointError, match="does not look like damaged files"):
        Checkpoints(str(tmp_path)).restore_latest(_target(_mesh(8)))
    assert sorted(os.listdir(ckpts.directory)) == ["10", "20"]


def test_damaged_files_are_told_apart_from_other_failures(tmp_path):
    """The exceptions real damage raises (truncated, deleted and garbled files of a checkpoint)
    classify as damage; the set-aside test above then only moves what these raise."""
    ckpts = _two_steps(tmp_path, steps=(1,))
    base = ckpts.path(1)
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(base) for f in fs)
    kinds = set()
    for how in ("truncate", "delete", "garble"):
        for f in files:
            shutil.copytree(base, base + ".bak")
            if how == "truncate":
                open(f, "wb").close()
            elif how == "delete":
                os.unlink(f)
            else:
                data = bytearray(open(f, "rb").read())
                data[::7] = bytes(b ^ 0x5A for b in data[::7])
                open(f, "wb").write(bytes(data))
            try:
                Checkpoints(str(tmp_path)).restore(1, _target(_mesh(8)))
            except Exception as e:  # noqa: BLE001 - classified below
                kinds.add((checkpoint.failure_kind(e), type(e).__name__, str(e).split(":")[0]))
            shutil.rmtree(base)
            shutil.move(base + ".bak", base)
    assert kinds and {k for k, *_ in kinds} == {checkpoint.DAMAGED}, kinds
    assert checkpoint.failure_kind(ValueError("UNAVAILABLE: 503")) == checkpoint.TRANSIENT
    assert checkpoint.failure_kind(ConnectionResetError()) == checkpoint.TRANSIENT
    assert checkpoint.failure_kind(ValueError("INVALID_ARGUMENT: shape")) == checkpoint.OTHER


# Two processes x 2 devices save steps 4 and 8 together, then restore with different views of
# the folder: process VIEW_OF sees only step 4 (a stale listing). Process 0 names the step.
AGREE = """
import sys, numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from gpt2_jax.parallel import distributed
distributed.initialize()
from gpt2_jax.interop.checkpoint import Checkpoints, abstract_with_shardings
from gpt2_jax.model import GPT2Config
workdir, stale = sys.argv[1], int(sys.argv[2])
mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
sh = {"w": NamedSharding(mesh, P("d"))}
make = lambda off: {"w": jax.make_array_from_callback((8, 2), sh["w"], lambda i: np.arange(16.0).reshape(8, 2)[i] + off)}
ck = Checkpoints(workdir)
for step in (4, 8):
    ck.save(step, make(step), {"next_batch": step}, {}, GPT2Config.from_preset("tiny"))
ck.close()
ck = Checkpoints(workdir)
if jax.process_index() == stale:
    ck.steps = lambda: [4]
r = ck.restore_latest(abstract_with_shardings(jax.eval_shape(lambda: make(0)), sh))
print("RESTORED", jax.process_index(), r.step, r.data_state["next_batch"], float(np.asarray(r.state["w"].addressable_data(0)).sum()), flush=True)
distributed.exit(0)
"""


@pytest.mark.parametrize("stale", [1, 0])
def test_two_processes_with_different_newest_checkpoints_restore_the_same_step(tmp_path, stale):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "GPT2_JAX_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]), DEVICES_PER_PROCESS="2",
               KILL_GRACE="2", TIMEOUT="120", GPT2_JAX_INIT_TIMEOUT="60")  # fmt: skip
    local_sh = Path(__file__).resolve().parents[1] / "launch" / "local.sh"
    proc = subprocess.run(["bash", str(local_sh), "2", sys.executable, str(script), str(tmp_path / "run"), str(stale)],
                          env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = sorted(line.split("RESTORED ", 1)[1] for line in proc.stdout.splitlines() if "RESTORED" in line)
    want = 8 if stale == 1 else 4  # process 0's view decides, whichever process is stale
    assert [g.split()[1:3] for g in got] == [[str(want), str(want)]] * 2, proc.stdout
    # each process holds its own rows of the restored array: rows of step `want`'s values
    expected = {i: float((np.arange(16.0).reshape(8, 2)[2 * i: 2 * i + 2] + want).sum()) for i in range(4)}
    assert {float(g.split()[3]) for g in got} <= set(expected.values()), proc.stdout
