"""gs:// workdirs against a GCS emulator on localhost (tests/gcs_emulator.py: generations and preconditions as on GCS):
training killed and resumed bit-exactly, export / evaluate / generate from gs://, the lock object, metrics."""

import json
import os
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from runs import ROOT, cli

sys.path.insert(0, str(Path(__file__).parent))
from gcs_emulator import client_env, emulator  # noqa: E402

pytestmark = pytest.mark.gcs

SETTINGS = {
    "data.bundled": "", "model.vocab_size": 512, "model.block_size": 32, "batch_size": 16, "total_steps": 8,
    "warmup_steps": 2, "eval_every": 0, "checkpoint_every": 4, "log_every": 1, "progress_bar": False,
    "sample.length": 0,
}  # fmt: skip


def _args(shards, workdir, **overrides):
    settings = {**SETTINGS, "data.path": shards, **overrides}
    return ["--config", "configs/tiny.py", "--workdir", str(workdir), *(f"--config.{k}={v}" for k, v in settings.items())]


@pytest.fixture(scope="module")
def gcs():
    """(host, environment for subprocesses); this process's own GCS calls go there too."""
    with emulator("bucket") as host:
        env = client_env(host)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield host, env
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compile_cache(tmp_path):
    """The three training runs compile the same steps: compile once (the persistent cache does not
    change what runs, so bit-identity still compares the same programs)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _gs_rows(path):
    from gpt2_jax.interop import paths

    return [json.loads(line) for line in paths.read_text(path).splitlines()]


def _no_local_gs_folder():
    for root in (ROOT, Path.cwd()):
        assert not (root / "gs:").exists(), f"something wrote to a local {root / 'gs:'} folder"


def test_train_killed_and_resumed_on_gs_matches_a_local_run_bit_for_bit(gcs, shards, tmp_path, capsys):
    host, env = gcs
    env = {**env, **_compile_cache(tmp_path)}
    local = tmp_path / "local"
    baseline = cli(*_args(shards, local), devices=2, env=env)  # env: only its compilation cache is used
    assert baseline.returncode == 0, baseline.stderr

    workdir = "gs://bucket/run"
    killed = cli(*_args(shards, workdir), devices=2, env={**env, "GPT2_JAX_FAULT": "sigkill_at:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    from gpt2_jax.interop import paths
    from gpt2_jax.interop.checkpoint import Checkpoints

    assert Checkpoints(workdir, create=False).steps() == [4]
    assert paths.exists(workdir + "/.lock")  # SIGKILL: no cleanup; the next run takes it over (same host, pid gone)
    resumed = cli(*_args(shards, workdir), devices=2, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {workdir}/checkpoints/4" in resumed.stdout
    assert Checkpoints(workdir, create=False).steps() == [4, 8]
    assert not paths.exists(workdir + "/.lock")  # released at the end

    # metrics.jsonl on gs://: each step once (rows past the checkpoint dropped on resume), equal to the local run's
    got = {r["step"]: r["loss"] for r in _gs_rows(workdir + "/metrics.jsonl") if "loss" in r}
    want = {r["step"]: r["loss"] for r in map(json.loads, (local / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    steps = [r["step"] for r in _gs_rows(workdir + "/metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9)) and got == want
    assert any(paths.basename(p).startswith("events.out.tfevents") for p in paths.walk_files(workdir))

    # bit-identical final parameters, read back through the product's own loader
    from gpt2_jax.interop.load import load_workdir

    a, b = load_workdir(workdir).params, load_workdir(str(local)).params
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
    _no_local_gs_folder()

    # the inference CLIs read the gs:// workdir and answer as from the local one (that one in-process)
    from gpt2_jax.cli import run
    from gpt2_jax.infer import generate
    from gpt2_jax.tools import evaluate

    argv = ["--prompt", "Hello", "--max_new_tokens", "4", "--temperature", "0"]
    gen = cli("--workdir", workdir, *argv, module="gpt2_jax.generate", env=env)
    assert gen.returncode == 0, gen.stderr
    capsys.readouterr()
    assert run(generate.main, ["--workdir", str(local), *argv]) == 0
    assert gen.stdout.split("@")[-1] == capsys.readouterr().out.split("@")[-1]  # the text after the label
    ev = cli("--workdir", workdir, "--data", shards, module="gpt2_jax.evaluate", env=env)
    assert ev.returncode == 0, ev.stderr
    assert run(evaluate.main, ["--workdir", str(local), "--data", shards]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(ev.stdout.splitlines()[-1])["loss"] == pytest.approx(want["loss"], rel=1e-5)
    ex = cli("--workdir", workdir, "--out", "gs://bucket/run_hf", module="gpt2_jax.export", env=env)
    assert ex.returncode == 0, ex.stderr
    out = tmp_path / "hf"  # the exported folder, downloaded: the local run's parameters, as HF loads them
    out.mkdir()
    for p in paths.walk_files("gs://bucket/run_hf"):
        (out / paths.basename(p)).write_bytes(paths.read_bytes(p))
    from gpt2_jax import load_hf

    _, exported = load_hf(str(out))
    for name in ("wpe", "h_0"):
        for x, y in zip(jax.tree_util.tree_leaves(exported[name]), jax.tree_util.tree_leaves(b[name])):
            assert np.array_equal(np.asarray(x), np.asarray(y)), name
    assert np.array_equal(np.asarray(exported["wte"]), np.asarray(b["wte"])[: exported["wte"].shape[0]])
    _no_local_gs_folder()


def test_the_lock_object_refuses_a_live_second_trainer_and_is_taken_from_a_dead_one(gcs):
    from gpt2_jax.interop import paths
    from gpt2_jax.train.lock import ObjectLock, WorkdirBusy, WorkdirLock

    workdir = "gs://bucket/locktest"
    assert isinstance(WorkdirLock(workdir), ObjectLock)
    with ObjectLock(workdir, lease_s=6.0) as held:  # renews every 1.5 s
        first_gen = held._generation
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
            ObjectLock(workdir, lease_s=6.0).acquire()  # it sees the holder renew: alive
        assert held._generation != first_gen  # renewed meanwhile, by compare-and-swap
    assert not paths.exists(workdir + "/.lock")
    # a holder on another host that stopped renewing: taken over after the lease
    assert paths.create_object(workdir + "/.lock", b"pid 1 on elsewhere (started 5)") is not None
    taker = ObjectLock(workdir, lease_s=0.5)
    taker.acquire()
    assert paths.read_object(workdir + "/.lock")[0].decode().startswith(f"pid {os.getpid()} ")
    taker.release()


def test_paths_read_ranges_and_write_whole_objects(gcs):
    from gpt2_jax.interop import paths

    paths.write_atomic("gs://bucket/p/x.bin", bytes(range(100)))
    assert paths.read_bytes("gs://bucket/p/x.bin", 10, 5) == bytes(range(10, 15))
    assert paths.size("gs://bucket/p/x.bin") == 100 and paths.listdir("gs://bucket/p") == ["x.bin"]
    assert paths.isdir("gs://bucket/p") and not paths.isdir("gs://bucket/nothing")


def test_shards_on_gs_give_the_same_batches_as_on_disk_reading_ranges(gcs, shards):
    from gpt2_jax.data import loader
    from gpt2_jax.data.shards import RemoteArray
    from gpt2_jax.interop import paths

    for name in sorted(os.listdir(shards)):
        paths.upload(os.path.join(shards, name), f"gs://bucket/data/{name}")
    remote = loader.Windows("gs://bucket/data", "train", block_size=32, vocab_size=512)
    local = loader.Windows(shards, "train", block_size=32, vocab_size=512)
    assert isinstance(remote.shards[0], RemoteArray) and len(remote) == len(local)
    ids = np.array([0, 7, len(local) - 1, 123])
    assert np.array_equal(remote.read(ids), local.read(ids))
    kw = dict(block_size=32, global_batch_size=4, seed=3, process_index=0, process_count=1, vocab_size=512)
    a, b = loader.make_train_iterator("gs://bucket/data", **kw), loader.make_train_iterator(shards, **kw)
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in y)


def test_metrics_on_gs_drop_rows_past_the_checkpoint_and_upload_events(gcs, tmp_path, monkeypatch):
    from gpt2_jax.interop import paths
    from gpt2_jax.train.metrics import MetricsWriter

    monkeypatch.chdir(tmp_path)  # a local "gs:" folder would appear here
    workdir = "gs://bucket/metrics"
    with MetricsWriter(workdir, total_steps=10, progress=False) as w:
        for step in range(1, 7):
            w.write(step, {"loss": 1.0 / step}, "train")
            if step == 4:
                w.flush()  # what the loop does at a checkpoint
                assert [r["step"] for r in _gs_rows(workdir + "/metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in _gs_rows(workdir + "/metrics.jsonl")] == [1, 2, 3, 4, 5, 6]  # close uploads
    events = [p for p in paths.walk_files(workdir) if "tfevents" in p]
    assert len(events) == 1 and paths.size(events[0]) > 0
    with MetricsWriter(workdir, total_steps=10, start_step=4, drop_after=4, progress=False) as w:  # resumed from 4
        assert [r["step"] for r in _gs_rows(workdir + "/metrics.jsonl")] == [1, 2, 3, 4]
        w.write(5, {"loss": 0.5}, "train")
    assert [r["step"] for r in _gs_rows(workdir + "/metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert os.listdir(tmp_path) == []
