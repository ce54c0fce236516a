"""launch/tpu_pod.sh against a fake gcloud (tests/fake_gcloud): create, reuse, recreate after a
preemption, a failed create, a preemption during the install, give-up; the calls it makes are checked."""

import json
import os
import subprocess
import sys

import pytest
from runs import ROOT

pytestmark = pytest.mark.gcloud

SCRIPT = ROOT / "launch" / "tpu_pod.sh"
FAKE = ROOT / "tests" / "fake_gcloud" / "gcloud"


def _pod(tmp_path, scenario, **env):
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    bin_dir = tmp_path / "bin"  # `gcloud` on PATH, run by this Python (no reliance on the file's x bit)
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(tmp_path),
           "TPU_NAME": "pod", "ZONE": "us-west4-a", "POLL_SECONDS": "0", **env}  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), "python", "-m", "gpt2_jax.train", "--workdir", "gs://b/run"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return proc, [_kind(c) for c in calls]


def _kind(call):
    """describe / create / delete / scp / install / run."""
    verb = call[3]
    if verb == "ssh":
        command = next(a for a in call if a.startswith("--command="))
        return "install" if "pip install" in command else "run"
    return verb


def test_help():
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "SKIP_INSTALL" in out.stdout and "SETTLE_CHECKS" in out.stdout


def test_creates_installs_and_runs(tmp_path):
    proc, calls = _pod(tmp_path, {"state": "NOT_FOUND"})
    assert proc.returncode == 0, proc.stderr
    assert calls == ["describe", "create", "describe", "scp", "install", "run"]
    assert "fake worker 0: ran with status 0" in proc.stdout


def test_reuses_a_ready_slice_with_skip_install(tmp_path):
    proc, calls = _pod(tmp_path, {"state": "READY", "installed": True}, SKIP_INSTALL="1")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["describe", "run"]


def test_a_preempted_slice_is_recreated_and_installed_again_despite_skip_install(tmp_path):
    # the ssh drops while describe still says READY for 2 more looks: the script keeps looking
    scenario = {"state": "READY", "installed": True, "run": [{"exit": 255, "state": "PREEMPTED", "lag": 2}]}
    proc, calls = _pod(tmp_path, scenario, SKIP_INSTALL="1", RETRIES="1")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["describe", "run", "describe", "describe", "describe",  # READY, READY, PREEMPTED
                     "describe", "delete", "create", "describe", "scp", "install", "run"]  # fmt: skip
    assert "installing despite SKIP_INSTALL=1" in proc.stderr
    assert "No such file or directory" not in proc.stderr


def test_gives_up_after_retries(tmp_path):
    preempted = {"exit": 255, "state": "PREEMPTED"}
    proc, calls = _pod(tmp_path, {"state": "NOT_FOUND", "run": [preempted] * 5}, RETRIES="2")
    assert proc.returncode == 255
    assert calls.count("run") == 3 and calls.count("create") == 3 and calls.count("delete") == 2
    assert "attempt 2 of 2" in proc.stderr and "run failed with status 255" in proc.stderr


def test_a_failed_create_is_retried(tmp_path):
    proc, calls = _pod(tmp_path, {"state": "NOT_FOUND", "create": ["fail", "ok"]}, RETRIES="1")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["describe", "create", "describe", "create", "describe", "scp", "install", "run"]
    assert "spot capacity?" in proc.stderr


def test_a_failed_create_without_retries_says_so(tmp_path):
    proc, calls = _pod(tmp_path, {"state": "NOT_FOUND", "create": ["fail"]})
    assert proc.returncode == 1 and calls == ["describe", "create"]
    assert "no more capacity" in proc.stderr and "giving up" in proc.stderr


def test_a_preemption_during_the_install_is_retried(tmp_path):
    scenario = {"state": "NOT_FOUND", "install": [{"exit": 255, "state": "PREEMPTED"}]}
    proc, calls = _pod(tmp_path, scenario, RETRIES="1")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["describe", "create", "describe", "scp", "install", "describe",
                     "describe", "delete", "create", "describe", "scp", "install", "run"]  # fmt: skip
    assert "copy/install stopped with status 255" in proc.stderr


def test_a_failing_command_on_a_ready_slice_is_not_retried(tmp_path):
    proc, calls = _pod(tmp_path, {"state": "READY", "installed": True, "run": [{"exit": 1}]},
                       SKIP_INSTALL="1", RETRIES="3", SETTLE_CHECKS="3")  # fmt: skip
    assert proc.returncode == 1
    assert calls == ["describe", "run", "describe", "describe", "describe"]  # looked 3 times, then stopped
    assert "run failed with status 1 (slice state: READY)" in proc.stderr
