"""train --dry_run: per-device memory from the compiled step; FSDP shrinks the state per device."""

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
