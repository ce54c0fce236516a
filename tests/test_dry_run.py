"""train --dry_run: per-device memory from the compiled step; FSDP shrinks the state per device."""

import re

import jax
import numpy as np
from runs import tiny

from gpt2_jax.parallel import sharding
from gpt2_jax.train import cli as train
from gpt2_jax.train import dry_run
from gpt2_jax.train import plan as plan_lib
from gpt2_jax.train.trainer import Trainer


def _per_device_state_bytes(c):
    """Bytes of the train state that each device holds, from the state's shardings."""
    p = plan_lib.plan(c, data=False)
    with sharding.use_mesh(p.mesh, p.rules):
        trainer = Trainer(c, p)
        total = sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                    for a in jax.tree_util.tree_leaves(trainer.abstract_state))  # fmt: skip
        estimate = dry_run.estimate(trainer, p, c.batch_size, c.grad_accum)
    return total, estimate


def test_fsdp_shards_parameters_and_optimizer_state_over_8_devices(shards):
    replicated, dp = _per_device_state_bytes(tiny(shards))  # 8 x 1 x 1: every device holds all
    sharded, fsdp = _per_device_state_bytes(tiny(shards, **{"mesh.data": 1, "mesh.fsdp": 8}))
    assert sharded < replicated / 7  # biases and LayerNorms are tiny; everything big splits 8 ways
    # XLA's memory analysis agrees: the arguments (state + batch) shrink the same way
    assert fsdp.arguments < dp.arguments / 6
    assert dp.arguments >= replicated and dp.total >= dp.arguments


def test_dry_run_prints_memory_and_flops_and_exits_0(shards, capsys):
    c = tiny(shards)
    assert train.compile_only(c) == 0
    out = capsys.readouterr().out
    assert "dry run: train step compiled for mesh data=8 x fsdp=1 x tensor=1 (8 devices)" in out
    for line in ("arguments", "outputs", "temporaries", "total", "model FLOPs per step"):
        assert f"\n  {line}" in out or line in out


def test_a_step_that_does_not_fit_says_which_knobs_to_turn(shards, capsys, monkeypatch):
    monkeypatch.setattr(dry_run, "_device_memory", lambda device: 1024)
    assert train.compile_only(tiny(shards)) == 1
    out = capsys.readouterr().out
    assert "does NOT fit: needs" in out and "raise grad_accum" in out and "mesh.fsdp=-1" in out


def test_host_available_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   24000000 kB\n")
    assert dry_run.host_available_bytes(str(meminfo)) == 24_000_000 * 1024
    assert dry_run.host_available_bytes(str(tmp_path / "missing")) > 0  # os.sysconf's free pages


def test_on_cpu_the_step_is_compared_with_the_hosts_available_ram(shards, capsys, monkeypatch):
    """XLA:CPU reports no memory limit; the 8 CPU devices share the host's RAM, so each gets an
    eighth of what is available. Before, every CPU dry run said nothing and exited 0."""
    monkeypatch.setattr(dry_run, "host_available_bytes", lambda: 8 * 2**30)
    assert dry_run._device_memory(jax.devices()[0]) == 2**30
    assert train.compile_only(tiny(shards)) == 0
    assert re.search(r"\nfits: \d+\.\d\d of 1\.00 GiB host RAM \(available RAM shared by 8 CPU devices\)",
                     capsys.readouterr().out)

    monkeypatch.setattr(dry_run, "host_available_bytes", lambda: 8 * 2**20)  # 1 MiB each: too small
    assert train.compile_only(tiny(shards)) == 1
    out = capsys.readouterr().out
    assert "does NOT fit: needs" in out and "GiB of host RAM (available RAM shared by 8 CPU devices)" in out
