"""A one-node SLURM cluster on localhost (munged, slurmctld, slurmd) in a temp folder, for the launch tests."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun")


def _sbin(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing():
    """Why the cluster cannot start here, or None."""
    absent = [d for d in DAEMONS if _sbin(d) is None]
    if absent:
        return f"SLURM/munge not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs its daemons as root"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Preemption: a job in 'high' requeues the jobs of 'low' (GraceTime: they get SIGTERM first).
# Time limits: KillWait is the grace between the time-limit SIGTERM and SIGKILL.
CONF = """\
ClusterName=gpt2test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
ReturnToService=2
MinJobAge=60
KillWait=30
OverTimeLimit=0
InactiveLimit=0
MessageTimeout=30
SlurmctldTimeout=30
SlurmdTimeout=60
SlurmdParameters=config_overrides
PlugStackConfig={dir}/plugstack.conf
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=low Nodes={host} Default=YES MaxTime=UNLIMITED State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60 OverSubscribe=NO
PartitionName=high Nodes={host} MaxTime=UNLIMITED State=UP PriorityTier=10 PreemptMode=OFF OverSubscribe=NO
"""


class Cluster:
    """The running daemons and the environment that points SLURM's commands at them."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pidfiles = [root / "slurmd.pid", root / "slurmctld.pid", root / "munged.pid"]

    def start(self):
        r = self.root
        (r / "state").mkdir()
        (r / "spool").mkdir()
        (r / "plugstack.conf").write_text("")
        key = r / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        r.chmod(0o755)  # munged wants its socket's folder reachable by all
        self.conf.write_text(CONF.format(host=self.host, cpus=self.cpus, dir=r,
                                         ctld_port=_free_port(), d_port=_free_port()))  # fmt: skip
        self._run(_sbin("munged"), "--force", f"--socket={r}/munge.sock", f"--key-file={key}",
                  f"--log-file={r}/munged.log", f"--pid-file={r}/munged.pid", f"--seed-file={r}/munged.seed")  # fmt: skip
        self._run(_sbin("slurmctld"), "-f", str(self.conf), "-i")  # -i: ignore any old state
        self._run(_sbin("slurmd"), "-f", str(self.conf), "-N", self.host)
        self._wait_idle()

    def _run(self, *cmd):
        subprocess.run(cmd, check=True, env=self.env, capture_output=True, timeout=60)

    def _wait_idle(self, timeout=120):
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            out = self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False)
            state = out.stdout.split()[0] if out.stdout.split() else ""
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(1)
        raise RuntimeError(f"test SLURM node never came up (state {state!r}); see {self.root}/slurm*.log")

    def cmd(self, *args, check=True, timeout=60):
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job(self, job_id):
        """scontrol's fields of a job, or {} once it is gone."""
        out = self.cmd("scontrol", "-o", "show", "job", str(job_id), check=False)
        if out.returncode:
            return {}
        fields = {}
        for item in out.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def release(self, job_id):
        """Let a pending job start now (SLURM holds a requeued job back for two minutes: its BeginTime)."""
        self.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)

    def stop(self):
        self.cmd("scancel", "--user=root", check=False)  # no job outlives the cluster
        for _ in range(100):
            if not self.cmd("squeue", "-h", check=False).stdout.strip():
                break
            time.sleep(0.2)
        for pidfile in self._pidfiles:  # slurmd first: it ends the job processes it started
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module", name="slurm")
def slurm_fixture(tmp_path_factory):
    """A started test cluster (skipped where SLURM or munge is missing); stopped at the end."""
    why = missing()
    if why and os.environ.get("CI"):  # .ci/run installs SLURM: a skip there would hide a broken install
        pytest.fail(why)
    if why:
        pytest.skip(why)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
