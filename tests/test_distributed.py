"""gpt2_jax.parallel.distributed and launch/local.sh: settings resolution, 2 processes x 2 CPU devices
doing cross-process collectives, and failures that end the run instead of hanging it."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpt2_jax.cli import UserError
from gpt2_jax.parallel import distributed

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"

# Each process: join, check the topology, then a jitted sum, a shard_map psum and an allgather
# over a global array assembled from per-process rows. MODE makes process 1 fail on purpose.
WORKER = textwrap.dedent(
    """
    import os, sys
    mode, pid = sys.argv[1], int(os.environ.get("JAX_PROCESS_ID", "0"))
    if mode == "die_before" and pid == 1:
        sys.exit(1)
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from gpt2_jax.parallel import distributed
    plan = distributed.initialize()
    print("JOINED", plan.process_id, plan.num_processes, flush=True)
    if mode == "die_after" and pid == 1:
        raise RuntimeError("process 1 fails on purpose")
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    mesh = jax.make_mesh((4,), ("d",))
    local = np.arange(2, dtype=np.float32) + 10 * jax.process_index()   # p0: [0, 1]  p1: [10, 11]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)  # global (4,)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P()))(x)
    gathered = multihost_utils.process_allgather(x, tiled=True)
    print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), float(total),
          float(np.asarray(psum.addressable_data(0))[0]), [float(v) for v in gathered], flush=True)
    distributed.exit(0)
    """
)


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "GPT2_JAX_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), KILL_GRACE="2", **extra)
    return env


def _local(n, *command, timeout=60, **env):
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(LOCAL_SH), str(n), *command], env=_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - start


def test_two_processes_two_devices_each_run_collectives(worker):
    proc, _ = _local(2, sys.executable, str(worker), "ok", TIMEOUT="50", GPT2_JAX_INIT_TIMEOUT="30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for i in range(2):
        lines = [l for l in proc.stdout.splitlines() if l.startswith(f"[{i}] RESULT")]
        # sum and psum of [0, 1, 10, 11] = 22 on every process; the allgather sees every row
        assert lines == [f"[{i}] RESULT {i} 2 4 22.0 22.0 [0.0, 1.0, 10.0, 11.0]"], proc.stdout


def test_process_dying_before_joining_stops_the_run(worker):
    # process 0 would wait 60 s to join; local.sh sees process 1 fail and stops it at once
    proc, took = _local(2, sys.executable, str(worker), "die_before", TIMEOUT="50", GPT2_JAX_INIT_TIMEOUT="60")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "process 1 exited with status 1; stopping the others" in proc.stderr
    assert "RESULT" not in proc.stdout and took < 30


def test_process_dying_after_joining_stops_the_run(worker):
    proc, took = _local(2, sys.executable, str(worker), "die_after", TIMEOUT="50", GPT2_JAX_INIT_TIMEOUT="30")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[1] RuntimeError: process 1 fails on purpose" in proc.stdout
    assert "RESULT" not in proc.stdout and took < 30


def test_without_a_launcher_a_dead_process_ends_the_others_within_the_heartbeat_timeout(worker):
    """No local.sh to kill anyone: process 1 dies after joining, and process 0, waiting in a
    collective, is stopped by JAX's heartbeat check (2 s here) instead of hanging."""
    port = subprocess.run(
        [sys.executable, "-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    common = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_NUM_CPU_DEVICES="2",
                  GPT2_JAX_INIT_TIMEOUT="30", GPT2_JAX_HEARTBEAT_TIMEOUT="2")  # fmt: skip
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), "die_after"],
            env=_env(JAX_PROCESS_ID=str(i), **common),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=45)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 1 and "fails on purpose" in outs[1]
    assert procs[0].returncode != 0 and "RESULT" not in outs[0], outs[0]
    assert time.monotonic() - start < 40


def test_join_timeout_is_one_line_naming_the_process(worker):
    env = _env(JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
               JAX_NUM_CPU_DEVICES="2", GPT2_JAX_INIT_TIMEOUT="2")  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(worker), "ok"], env=env, capture_output=True, text=True, timeout=40)
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert errors and errors[0].startswith(
        "error: process 1 of 2 (explicit, coordinator 127.0.0.1:1) timed out after 2 s"
    )
    assert time.monotonic() - start < 30


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# What srun sets for 2 tasks on one node (launch/slurm_gpu.sbatch), and what Open MPI's mpirun sets.
LAUNCHERS = {
    "slurm": lambda i: {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
                        "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
    "mpi": lambda i: {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2",
                      "OMPI_COMM_WORLD_RANK": str(i), "OMPI_COMM_WORLD_LOCAL_RANK": str(i)},
}  # fmt: skip


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_variables_alone_start_a_two_process_run(worker, launcher):
    """No JAX_* settings: jax.distributed.initialize's own cluster detection does the rest."""
    common = {"JAX_COORDINATOR_PORT": _free_port(), "JAX_NUM_CPU_DEVICES": "2", "GPT2_JAX_INIT_TIMEOUT": "30"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), "ok"],
            env=_env(**LAUNCHERS[launcher](i), **common),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, out in enumerate(outs):
        assert f"RESULT {i} 2 4 22.0 22.0 [0.0, 1.0, 10.0, 11.0]" in out, out
        assert f"JOINED {i} 2" in out, out


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(**env), capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_libtpu_without_a_pod_is_one_process():
    """Where libtpu is installed JAX's detection decides; finding no pod, the run is one process."""
    proc = _python(
        """
        from gpt2_jax.parallel import distributed
        distributed._tpu_runtime_installed = lambda: True
        plan = distributed.initialize()
        import jax
        print(plan.source, plan.num_processes, jax.process_count(), jax.distributed.is_initialized())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["single", "1", "1", "False"]


def test_starting_after_a_device_was_used_is_one_line():
    proc = _python(
        """
        import sys
        import jax
        from gpt2_jax.parallel import distributed
        jax.devices()
        try:
            distributed.initialize(coordinator="127.0.0.1", num_processes=2, process_id=0, port=1)
        except distributed.DistributedError as e:
            print(e)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("process 0 of 2 (explicit, coordinator 127.0.0.1:1): could not start the distributed")
    assert proc.stdout.strip().endswith("call gpt2_jax.parallel.distributed.initialize() first thing in main()")
    assert len(proc.stdout.strip().splitlines()) == 1


def test_no_private_jax_api():
    """jax._src moves between releases; start-up and preemption use public JAX only."""
    for module in ("gpt2_jax/parallel/distributed.py", "gpt2_jax/train/preemption.py"):
        assert "_src" not in (ROOT / module).read_text(), module


# --- settings (no processes started) ---------------------------------------------------------


def test_resolve_sources_and_precedence():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    plan = distributed.resolve(environ=env, tpu_runtime=False)
    assert (plan.source, plan.coordinator, plan.num_processes, plan.process_id) == ("explicit", "10.0.0.1:8476", 4, 3)
    plan = distributed.resolve(process_id=1, port=999, environ=env, tpu_runtime=False)  # flags win over variables
    assert (plan.coordinator, plan.process_id) == ("10.0.0.1:999", 1)
    assert distributed.resolve(coordinator="h:5", num_processes=2, process_id=0, environ={}).coordinator == "h:5"
    assert not distributed.resolve(num_processes=1, environ=env, tpu_runtime=True).multi_process
    assert distributed.resolve(environ={}, tpu_runtime=False).source == "single"
    assert distributed.resolve(environ={}, tpu_runtime=True).source == "tpu"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "1"}  # fmt: skip
    plan = distributed.resolve(init_timeout=12, environ=slurm, tpu_runtime=False)
    assert (plan.source, plan.num_processes, plan.process_id, plan.init_timeout) == ("slurm", 8, 5, 12.0)
    assert distributed.resolve(environ={**slurm, "SLURM_NTASKS": "1"}, tpu_runtime=True).source == "single"
    mpi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.2:1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}
    plan = distributed.resolve(environ=mpi, tpu_runtime=False)
    assert (plan.source, plan.coordinator, plan.num_processes, plan.process_id) == ("mpi", None, 4, 2)
    assert distributed.resolve(environ={**mpi, "OMPI_COMM_WORLD_SIZE": "1"}, tpu_runtime=False).source == "single"
    plan = distributed.resolve(environ={"GPT2_JAX_HEARTBEAT_TIMEOUT": "7.5"}, tpu_runtime=False)
    assert plan.heartbeat_timeout == 7.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_processes=2, process_id=0), "needs --coordinator (or JAX_COORDINATOR_ADDRESS)"),
        (dict(coordinator="h", num_processes=2, process_id=2), "--process_id 2 is out of range"),
        (dict(coordinator="h:x", num_processes=2, process_id=0), "expected HOST, HOST:PORT"),
        (dict(coordinator="h", num_processes=0, process_id=0), "--num_processes must be an integer >= 1"),
        (dict(num_processes=1, process_id=1), "the only process is 0"),
        (dict(coordinator="h", num_processes=2, process_id=0, init_timeout=0), "--init_timeout must be a positive"),
        (dict(environ={"JAX_NUM_PROCESSES": "two"}), "JAX_NUM_PROCESSES='two' is not an integer"),
    ],
)
def test_resolve_errors_are_user_errors(kwargs, message):
    kwargs.setdefault("environ", {})
    with pytest.raises(distributed.DistributedError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distributed.resolve(tpu_runtime=False, **kwargs)
    assert issubclass(distributed.DistributedError, UserError)


def test_pop_flags_leaves_the_other_arguments_in_order():
    argv = ["train", "--config", "c.py", "--num_processes=2", "--process_id", "1", "--workdir", "w",
            "--coordinator", "h:9", "--init_timeout", "30", "--coordinator_port=7", "--heartbeat_timeout=5"]  # fmt: skip
    rest, kw = distributed.pop_flags(argv)
    assert rest == ["train", "--config", "c.py", "--workdir", "w"]
    assert kw == dict(
        num_processes=2, process_id=1, coordinator="h:9", init_timeout=30.0, port=7, heartbeat_timeout=5.0
    )
    with pytest.raises(distributed.DistributedError, match="--process_id 'x': expected an integer"):
        distributed.pop_flags(["--process_id", "x"])
    with pytest.raises(distributed.DistributedError, match="--coordinator needs a value"):
        distributed.pop_flags(["--coordinator"])


def test_local_sh_help_and_early_errors():
    out = subprocess.run(["bash", str(LOCAL_SH), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "DEVICES_PER_PROCESS" in out.stdout
    bad = subprocess.run(["bash", str(LOCAL_SH), "two", "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "N must be a positive integer" in bad.stderr
    missing = subprocess.run(["bash", str(LOCAL_SH), "2", "no-such-command-xyz"], capture_output=True, text=True)
    assert missing.returncode == 2 and "command not found: no-such-command-xyz" in missing.stderr


# --- training: 2 processes x 2 devices against 1 process x 4 devices -----------------------------

# Constant learning rate, so a 4-step run and the first 4 steps of an 8-step run are the same steps.
TINY = ["--config", str(ROOT / "configs" / "tiny.py"), "--config.log_every=1", "--config.eval_every=0",
        "--config.sample.length=0", "--config.progress_bar=False", "--config.warmup_steps=0",
        "--config.min_lr_ratio=1.0", "--config.checkpoint_every=100"]  # fmt: skip


def _train(workdir, steps, processes):
    args = [*TINY, f"--workdir={workdir}", f"--config.total_steps={steps}"]
    if processes == 1:
        cmd = [sys.executable, "-m", "gpt2_jax.train", *args]
        proc = subprocess.run(cmd, env=_env(JAX_NUM_CPU_DEVICES="4"), capture_output=True, text=True, timeout=120)
    else:
        proc, _ = _local(processes, sys.executable, "-m", "gpt2_jax.train", *args, timeout=120, TIMEOUT="110",
                         DEVICES_PER_PROCESS="2", GPT2_JAX_INIT_TIMEOUT="60")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert len(losses) == sum("loss" in r for r in rows), "a step was logged twice (by more than process 0?)"
    return losses


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("one") / "run", 8, processes=1)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two") / "run"
    return workdir, _train(workdir, 4, processes=2)


def test_two_processes_train_like_one_process_with_four_devices(one_process_losses, two_process_run):
    _, losses = two_process_run
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in losses.items():
        assert loss == pytest.approx(one_process_losses[step], rel=1e-5, abs=1e-6), step


def test_two_process_checkpoint_resumes_in_one_process(one_process_losses, two_process_run):
    workdir, _ = two_process_run
    assert (workdir / "checkpoints" / "4").is_dir()
    resumed = _train(workdir, 8, processes=1)  # metrics.jsonl is appended to: steps 1-4, then 5-8
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(one_process_losses[step], rel=1e-5, abs=1e-6), step


def test_train_cli_refuses_incomplete_multi_process_flags_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "gpt2_jax.train", *TINY, f"--workdir={tmp_path / 'run'}", "--num_processes", "2"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: a multi-process run needs --coordinator (or JAX_COORDINATOR_ADDRESS), "
        "--process_id (or JAX_PROCESS_ID) as well"
    )
