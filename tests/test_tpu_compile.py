"""--dry_run --topology: the real train step compiled for a TPU slice on this CPU host (libtpu, no TPU)."""

import importlib.util
import json

import jax
import numpy as np
import pytest
from runs import cli, tiny

from gpt2_jax.parallel import sharding, topology
from gpt2_jax.train import cli as train
from gpt2_jax.train import plan as plan_lib
from gpt2_jax.train.trainer import Trainer

pytestmark = [
    pytest.mark.tpu,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='needs libtpu: pip install -e ".[tpu]"'),
]


@pytest.fixture(scope="module", autouse=True)
def _quiet_libtpu():
    """libtpu's settings for a host without TPUs, before it starts in this process (only where these tests run)."""
    topology.quiet_libtpu()

SPLASH = {"model.block_size": 128, "model.n_positions": 128}  # the splash kernel runs 128-token blocks


def _lowered(c, devices):
    """The trainer's train step lowered for `devices`, as --dry_run lowers it."""
    p = plan_lib.plan(c, data=False, devices=devices)
    with sharding.use_mesh(p.mesh, p.rules):
        trainer = Trainer(c, p)
        shape = (p.grad_accum, c.batch_size // p.grad_accum, p.block_size)
        batch = {k: jax.ShapeDtypeStruct(shape, d, sharding=trainer.train_batch_sharding)
                 for k, d in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}  # fmt: skip
        return p, trainer.train_fn.lower(trainer.abstract_state, batch)


def test_splash_attention_lowers_through_mosaic_for_a_tpu_slice(shards):
    """Before, the kernel's interpret flag asked the host (a CPU), so a TPU compile got the
    emulation and no Mosaic call at all; 'auto' now picks splash on TPU."""
    devices = topology.topology_devices(topology.parse("v5e:2x2"))
    p, lowered = _lowered(tiny(shards, **SPLASH), devices)
    assert p.model.attention == "pallas" and p.mesh.devices.flat[0].platform == "tpu"
    text = lowered.as_text()  # the next test compiles this step (through the CLI)
    assert text.count("tpu_custom_call") >= 3  # the forward kernel and the backward's dq and dkv kernels
    _, xla = _lowered(tiny(shards, **SPLASH, **{"model.attention": "xla"}), devices)
    assert "tpu_custom_call" not in xla.as_text()


def _run(capsys, *args):
    code = train.main(["train", "--config", "tiny", "--dry_run", *args])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured


def test_the_tiny_config_fits_a_v5e_2x2_and_says_so_in_json(capsys):
    code, row, cap = _run(capsys, "--topology", "v5e:2x2", *(f"--config.{k}={v}" for k, v in SPLASH.items()))
    assert code == 0, cap.err
    assert (row["topology"], row["devices"], row["device_kind"]) == ("v5e:2x2", 4, "TPU v5 lite")
    assert row["hbm_bytes_per_device"] == 16 * 2**30 and row["fits"] is True and row["attention"] == "pallas"
    assert 0 < row["peak_bytes_per_device"] < 2**30 and row["arguments_bytes"] > 0 and row["compile_s"] > 0
    assert "fits:" in cap.out and "the compiler's verdict" in cap.out


def test_a_step_the_chip_cannot_hold_exits_1_with_the_compilers_verdict(capsys):
    # 4096 sequences per chip: the float32 logits alone are ~50 GiB, against 16 GiB of HBM
    code, row, cap = _run(capsys, "--topology", "v5e:2x2", "--config.batch_size=16384")
    assert code == 1, cap.err
    assert row["fits"] is False and row["peak_bytes_per_device"] is None
    assert row["oom_required_bytes"] > row["hbm_bytes_per_device"]
    assert "RESOURCE_EXHAUSTED" in cap.out and "does NOT fit" in cap.out and "raise grad_accum" in cap.out


@pytest.mark.parametrize("args, words", [
    (["--topology", "v5e:2x2x1"], "a v5e slice has 2 dimensions"),
    (["--topology", "h100:8"], "is not a TPU slice"),
])  # fmt: skip
def test_a_bad_topology_or_mesh_is_one_error_line(capsys, args, words):
    code, row, cap = _run(capsys, *args)
    assert code == 2 and row is None
    assert len(cap.err.strip().splitlines()) == 1 and words in cap.err and cap.err.startswith("error: ")


def test_libtpu_starts_quietly_on_a_cpu_host_and_the_mesh_is_the_slices():
    """A fresh process with JAX_PLATFORMS unset (libtpu would look for TPUs and print
    TPU_WORKER_HOSTNAMES / TPU_ACCELERATOR_TYPE errors): the only line on stderr is ours."""
    out = cli("--config", "tiny", "--dry_run", "--topology", "v5e:2x2", "--config.mesh.data=8", env={"JAX_PLATFORMS": ""})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == ["error: mesh data x fsdp x tensor = 8 x 1 x 1 = 8 but there are 4 "
                                               "devices; make the product 4 or set one axis to -1"]  # fmt: skip


def test_tpu_v5e_2x2_fsdp_gathers_in_bf16_inside_the_loop_and_peak_memory_falls_with_fsdp():
    """tests/test_fsdp.py's HLO check, for a TPU slice's compiler, and per-chip peak memory by fsdp."""
    from test_fsdp import _check, _compile, _config

    devices = topology.topology_devices(topology.parse("v5e:2x2"))
    assert len(devices) == 4 and devices[0].platform == "tpu"
    peaks = {}
    for fsdp in (1, 4):
        trainer, compiled = _compile(_config(fsdp=fsdp, data=-1), devices)
        peaks[fsdp] = compiled.memory_analysis().peak_memory_in_bytes
        if fsdp > 1:
            _check(trainer, compiled.as_text(), compiled.as_text())
    assert peaks[4] < 0.8 * peaks[1], peaks
