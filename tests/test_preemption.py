"""Preemption under jax.distributed: a SIGTERM to one process stops every process at one agreed
step (JAX's preemption sync point), with a checkpoint of that step that resumes bit-exact."""

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_jax.interop.checkpoint import Checkpoints
from gpt2_jax.interop.load import load_workdir

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"

# Each process: join, then "steps" from START (a resumed run) asking StopRequest at every one;
# process 1 is signalled (before the loop, or after step START + 5) and everyone prints its stop.
WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    from gpt2_jax.parallel import distributed
    distributed.initialize()
    import jax
    from jax.experimental import multihost_utils
    from gpt2_jax.train.preemption import StopRequest
    start, when, signame = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    me = jax.process_index()
    with StopRequest() as stop:
        if when == "early":  # during "compilation": every process, before any step
            os.kill(os.getpid(), getattr(signal, signame))
            time.sleep(2.5)  # JAX's notifier looks about once a second
        for step in range(start + 1, start + 2000):
            multihost_utils.sync_global_devices(f"step {step}")  # a collective, as a train step has
            time.sleep(0.005)
            if when == "late" and me == 1 and step == start + 5:
                os.kill(os.getpid(), getattr(signal, signame))
            if step == start + 3:
                print("RUNNING", me, flush=True)
            signum = stop.agreed(step, sync=False)
            if signum:
                print("STOPPED", me, step, signum, flush=True)
                break
    distributed.exit(0)
    """
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "GPT2_JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), KILL_GRACE="20", GPT2_JAX_INIT_TIMEOUT="60", **extra)
    return env


def _local(*command, timeout=150, **env):
    return subprocess.run(["bash", str(LOCAL_SH), "2", *command], env=_env(TIMEOUT=str(timeout - 10), **env),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip


@pytest.mark.parametrize("when, signame", [("late", "SIGTERM"), ("late", "SIGINT"), ("early", "SIGTERM")])
def test_processes_agree_on_the_stop_step_at_any_step(tmp_path, when, signame):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = _local(sys.executable, str(script), "100", when, signame, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stops = {int(m[1]): (int(m[2]), int(m[3])) for m in re.finditer(r"STOPPED (\d) (\d+) (\d+)", proc.stdout)}
    assert sorted(stops) == [0, 1], proc.stdout[-3000:]
    (step0, sig0), (step1, sig1) = stops[0], stops[1]
    assert step0 == step1, stops  # one agreed step, whichever process was signalled
    if when == "early":  # a notice before the first step stops after it, even when resuming at 100
        assert step0 == 101
    else:
        assert 106 <= step0 < 2000
    signum = int(getattr(signal, signame))
    assert sig1 == (signum if when == "late" else signal.SIGTERM) and sig0 == signal.SIGTERM


def test_sigterm_to_local_sh_stops_every_process_at_one_step(tmp_path):
    """What a scheduler does: SIGTERM to the launcher, passed on to every process."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.Popen(["bash", str(LOCAL_SH), "2", sys.executable, str(script), "0", "never", "-"],
                            env=_env(TIMEOUT="50"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        out, running = [], 0
        for line in proc.stdout:
            out.append(line)
            running += line.startswith(("[0] RUNNING", "[1] RUNNING"))
            if running == 2:
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=50)
    finally:
        proc.kill()
    stdout = "".join(out) + rest
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err, stdout[-2000:] + err
    stops = {int(m[1]): (int(m[2]), int(m[3])) for m in re.finditer(r"STOPPED (\d) (\d+) (\d+)", stdout)}
    assert sorted(stops) == [0, 1] and stops[0] == stops[1], stdout[-2000:]
    assert stops[0][0] >= 3 and stops[0][1] == signal.SIGTERM


SETTINGS = {
    "data.bundled": "", "model.vocab_size": 512, "model.block_size": 32, "batch_size": 16, "total_steps": 12,
    "warmup_steps": 2, "eval_every": 0, "checkpoint_every": 100, "log_every": 10, "progress_bar": False,
    "sample.length": 0,
}  # fmt: skip


def _train(shards, workdir, fault=None):
    """A 2-process x 2-device run; `fault` is GPT2_JAX_FAULT for process 1 only."""
    args = ["--config", "configs/tiny.py", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in {**SETTINGS, "data.path": shards}.items())]  # fmt: skip
    inject = f'[ "$JAX_PROCESS_ID" = 1 ] && export GPT2_JAX_FAULT={fault}; ' if fault else ""
    command = inject + 'exec "$@"'
    return _local("bash", "-c", command, "train", sys.executable, "-m", "gpt2_jax.train", *args)


def _params(workdir, step):
    return jax.tree_util.tree_map(np.asarray, load_workdir(str(workdir), step).params)


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes_bit_exact(shards, tmp_path):
    workdir = tmp_path / "run"
    stopped = _train(shards, workdir, fault="sigterm_at:3")  # SIGTERM to process 1 after step 3
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    lines = re.findall(r"\[(\d)\] stopped by SIGTERM after step (\d+); checkpoint (\S+) saved", stopped.stdout)
    assert sorted(p for p, _, _ in lines) == ["0", "1"], stopped.stdout[-3000:]
    (step,) = {int(s) for _, s, _ in lines}  # both processes stopped after the same step
    assert 4 <= step < SETTINGS["total_steps"]  # not at a log step (log_every is 10)
    assert Checkpoints(str(workdir), create=False).steps() == [step]

    resumed = _train(shards, workdir)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {workdir}/checkpoints/{step}" in resumed.stdout
    straight = _train(shards, tmp_path / "straight")
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    last = SETTINGS["total_steps"]
    a, b = _params(workdir, last), jax.tree_util.tree_leaves(_params(tmp_path / "straight", last))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"
