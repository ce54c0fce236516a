"""train --dry_run: per-device memory from the compiled step; FSDP shrinks the state per device."""

import re

import jax
import numpy as np
import pytest
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


def _last_json(out):
    import json

    return json.loads(out.strip().splitlines()[-1])


def test_the_last_line_is_json_with_the_compilers_numbers(shards, capsys):
    c = tiny(shards)
    assert train.compile_only(c) == 0
    row = _last_json(capsys.readouterr().out)
    assert row["topology"] is None and row["devices"] == 8 and row["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    # the same numbers as a compile of our own: the estimate is the compiler's, not a formula
    _, e = _per_device_state_bytes(c)
    assert row["arguments_bytes"] == e.arguments and row["temporaries_bytes"] == e.temporaries
    # XLA:CPU's peak_memory_in_bytes leaves the temporaries out: on CPU the total is what a step needs
    assert row["peak_bytes_per_device"] == e.needed == e.total > e.temporaries > 0
    # on CPU the "HBM" is this device's share of the host's available RAM, which moves between calls
    assert row["fits"] is (row["peak_bytes_per_device"] <= row["hbm_bytes_per_device"]) and row["compile_s"] > 0


def test_topology_names_and_their_chips():
    from gpt2_jax.parallel import topology

    s = topology.parse("v5p:2x2x1")
    assert (s.name, s.num_chips, s.libtpu_topology, s.chip.hbm_bytes) == ("v5p:2x2x1", 4, "v5:2x2x1", 95 * 2**30)
    assert topology.parse("v5litepod:4x4").name == "v5e:4x4" and topology.parse("v6e:2x4").num_chips == 8
    assert [topology.accelerator_type(topology.parse(n)) for n in ("v5e:2x2", "v5p:2x2x1", "v4:2x2x2", "v6e:2x4")] \
        == ["v5litepod-4", "v5p-8", "v4-16", "v6e-8"]  # Google Cloud's names (v4 / v5p count TensorCores)
    for bad, words in (("v9:2x2", "is not a TPU slice"), ("v5e:2x2x1", "has 2 dimensions"), ("v4:2x2", "has 3")):
        with pytest.raises(topology.TopologyError, match=words):
            topology.parse(bad)


def test_topology_without_libtpu_is_one_error_line(monkeypatch, capsys):
    from gpt2_jax.parallel import topology

    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    assert train.main(["train", "--config", "tiny", "--dry_run", "--topology", "v5e:2x2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: --topology v5e:2x2 compiles with libtpu, which is not installed: pip install -e ".[tpu]"']
    assert train.main(["train", "--config", "tiny", "--topology=v5e:2x2", "--workdir", "/tmp/unused"]) == 2
    assert "use it with --dry_run" in capsys.readouterr().err


def test_the_attention_kernel_follows_the_mesh_not_the_process():
    """'auto' means splash on a TPU mesh, even traced on a CPU host; a CPU mesh keeps XLA's."""
    from jax._src.mesh import AbstractDevice  # what a Mesh of TPU devices gives its AbstractMesh
    from jax.sharding import AbstractMesh, AxisType

    from gpt2_jax.model import GPT2Config, attention, attention_kernel

    cfg = GPT2Config.from_preset("tiny")
    tpu = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = AbstractMesh((4,), ("data",), axis_types=(AxisType.Auto,), abstract_device=tpu)
    assert attention.platform() == "cpu" and attention_kernel(cfg) == "xla"
    with jax.sharding.use_abstract_mesh(mesh):
        assert attention.platform() == "tpu" and attention_kernel(cfg) == "pallas"
    assert attention.platform(jax.devices()[:2]) == "cpu" and attention_kernel(cfg, "tpu") == "pallas"


def test_the_plan_builds_its_mesh_from_the_given_devices(shards):
    p = plan_lib.plan(tiny(shards, **{"mesh.data": -1}), data=False, devices=jax.devices()[2:6])
    assert p.mesh.size == 4 and list(p.mesh.devices.flat) == jax.devices()[2:6]
