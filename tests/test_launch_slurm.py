"""launch/slurm_gpu.sbatch on a one-node SLURM on localhost: 2 tasks train like 1 process; a time
limit and a preemption both requeue the job, which resumes bit-exact (CPU processes, tiny model)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs import ROOT, cli
from slurm_cluster import slurm_fixture  # noqa: F401  (the `slurm` fixture)

pytestmark = pytest.mark.slurm

SBATCH = ROOT / "launch" / "slurm_gpu.sbatch"
# Constant learning rate: the first k steps of a run do not depend on total_steps, so a long
# job can be compared with a short reference run.
CONSTANT_LR = ["--config.warmup_steps=0", "--config.min_lr_ratio=1.0"]
CPU_ONLY = ["--cpus-per-task=1", "--gpus-per-node=0"]


def _args(shards, workdir, total_steps):
    return ["--config", "tiny", f"--workdir={workdir}", f"--config.total_steps={total_steps}",
            "--config.model.vocab_size=512", "--config.model.block_size=32", f"--config.data.path={shards}",
            "--config.data.bundled=", "--config.batch_size=16", "--config.eval_every=0", "--config.log_every=1",
            "--config.progress_bar=False", "--config.sample.length=0", "--config.checkpoint_every=1000",
            *CONSTANT_LR]  # fmt: skip


def _losses(workdir):
    """step -> loss; a step logged twice (by two processes, or again after a resume) is an error."""
    path = Path(workdir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _latest_checkpoint(workdir):
    folder = Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=0)


class Reference:
    """1-process losses on 2 CPU devices (the global device count of the SLURM runs), run once
    for the longest prefix asked for."""

    def __init__(self, shards, root):
        self.shards, self.root, self.losses = shards, root, {}

    def __call__(self, steps):
        if len(self.losses) < steps:
            workdir = self.root / f"ref{steps}"
            run = cli(*_args(self.shards, workdir, steps), devices=2, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
            self.losses = _losses(workdir)
        return {s: self.losses[s] for s in range(1, steps + 1)}


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    return Reference(shards, tmp_path_factory.mktemp("reference"))


def _submit(slurm, workdir, shards, total_steps, *options, tasks=1):
    log = Path(workdir).parent / f"{Path(workdir).name}.log"
    env_opts = [(f"--export=ALL,JAX_PLATFORMS=cpu,XLA_FLAGS=--xla_force_host_platform_device_count={2 // tasks},"
                 "GPT2_JAX_INIT_TIMEOUT=120")]  # fmt: skip
    out = slurm.cmd("sbatch", "--parsable", f"--output={log}", f"--ntasks-per-node={tasks}", *CPU_ONLY,
                    *env_opts, *options, str(SBATCH), sys.executable, "-m", "gpt2_jax.train",
                    *_args(shards, workdir, total_steps))  # fmt: skip
    return out.stdout.strip().split(";")[0], log


def _wait(what, check, timeout, log):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; job log:\n{log.read_text()[-4000:] if log.exists() else ''}")


def _wait_requeued(slurm, job, log, timeout=180, time_limit=None):
    """Wait until the job is back in the queue after its first run, then start it at once (SLURM
    holds a requeued job back for two minutes), with a new `time_limit` (minutes) if given."""

    def requeued():
        info = slurm.job(job)
        if info.get("Restarts", "0") == "0":
            return None
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            if time_limit:
                slurm.cmd("scontrol", "update", f"JobId={job}", f"TimeLimit={time_limit}", check=False)
            slurm.release(job)
        return info.get("JobState") == "RUNNING"

    _wait("the requeued job to start", requeued, timeout, log)


def _wait_done(slurm, job, log, timeout=300):
    def ended():
        state = slurm.job(job).get("JobState")
        return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None

    return _wait("the job to end", ended, timeout, log), slurm.job(job)


def test_help_tells_cpu_only_users_what_to_override():
    out = subprocess.run(["bash", str(SBATCH), "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0
    for option in ("--ntasks-per-node", "--cpus-per-task", "--gpus-per-node", "scontrol requeue"):
        assert option in out.stdout


def test_time_limit_requeues_and_resumes_bit_exact(slurm, shards, reference, tmp_path):
    """--time=1 with the warning signal 15 s ahead: slurmctld signals the batch script 15-45 s in;
    the trainer checkpoints and exits 143; the script requeues; the second run resumes."""
    workdir = tmp_path / "run"
    job, log = _submit(slurm, workdir, shards, 100_000, "--time=1", "--signal=B:USR1@15")
    _wait_requeued(slurm, job, log, time_limit=5)  # the second run: no second time limit
    stop = _latest_checkpoint(workdir)
    assert stop, log.read_text()[-3000:]
    # the second run: a few steps past the checkpoint, then a plain scancel ends it for good
    _wait("the resumed run to log 3 steps", lambda: len(_losses(workdir)) >= stop + 3, 120, log)
    slurm.cmd("scancel", job)
    state, info = _wait_done(slurm, job, log)
    text = log.read_text()
    assert "got SIGUSR1" in text and "requeueing job" in text and "restart 1" in text, text[-3000:]
    assert "restart 0" in text, "the requeued run truncated the log (--open-mode=append)"
    assert info["Restarts"] == "1" and state != "PENDING", info  # scancel ended it: not requeued again
    got = _losses(workdir)
    want = reference(len(got))
    assert sorted(got) == list(range(1, len(got) + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(got)]  # bit-exact


def test_two_tasks_preempted_by_a_higher_priority_job_resume_like_one_process(slurm, shards, reference, tmp_path):
    """2 srun tasks x 1 CPU device; a job in the 'high' partition needs the whole node, so SLURM
    preempts this one (GraceTime: SIGTERM to the tasks); it requeues itself, resumes, completes."""
    steps = 150  # long enough that the preemption (a second or two) lands mid-run on a fast machine
    workdir = tmp_path / "run"
    job, log = _submit(slurm, workdir, shards, steps, "--time=5", tasks=2)
    _wait("step 3", lambda: len(_losses(workdir)) >= 3, 180, log)
    slurm.cmd("sbatch", "--partition=high", "--ntasks=2", "--time=1", "--output=/dev/null", "--wrap=true")
    _wait_requeued(slurm, job, log)
    stopped_at = _latest_checkpoint(workdir)
    assert 3 <= stopped_at < steps, f"no checkpoint between step 3 and the end:\n{log.read_text()[-3000:]}"
    state, info = _wait_done(slurm, job, log)
    text = log.read_text()
    assert state == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    got = _losses(workdir)
    assert sorted(got) == list(range(1, steps + 1))
    want = reference(steps)
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(got)], "2 tasks differ from 1 process"
