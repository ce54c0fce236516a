"""FLOPs per token, device peaks and MFU; the metrics.jsonl / TensorBoard writer."""

import json
import os

import jax
import pytest

from gpt2_jax.model import GPT2Config
from gpt2_jax.train import flops, metrics


def test_flops_per_token_counts_matmuls_and_attention():
    gpt2 = GPT2Config.from_preset("gpt2")  # unpadded vocabulary
    matmul = 12 * 12 * 768**2 + 50257 * 768  # blocks' kernels + tied LM head
    assert flops.matmul_params(gpt2) == matmul == 123_532_032
    assert flops.flops_per_token(gpt2, 1024) == 6 * matmul + 12 * 12 * 768 * 1024
    padded = gpt2.replace(vocab_pad_multiple=128)  # the padded head is computed too
    assert flops.matmul_params(padded) - matmul == (50304 - 50257) * 768


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA B200", "bfloat16", 2250e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),  # TF32
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("Some New Accelerator", "bfloat16", None),
])
def test_device_peaks(kind, dtype, peak):
    assert flops.device_peak_flops(kind, dtype) == peak


def test_cpu_devices_share_one_host_peak_and_the_override_wins():
    devices = jax.devices()  # 8 virtual CPU devices in one process
    host = flops.total_peak_flops(devices, "float32")
    if host is not None:  # Linux: cores x clock x SIMD width
        assert host == flops.total_peak_flops(devices[:1], "float32")
    assert flops.total_peak_flops(devices, "float32", override_per_device=1e12) == 1e12


def test_mfu_is_absent_without_a_peak():
    assert flops.mfu(1000.0, 1e9, None) is None
    assert flops.mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)


def test_writer_appends_rows_and_tensorboard_events(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), total_steps=10, progress=False) as w:
        w.write(5, {"loss": 2.5, "lr": 1e-3, "tokens_per_sec": 100.0, "mfu": None}, "train")
        w.write(5, {"val_loss": 2.0, "val_ppl": 7.39, "sample": "hi"}, "eval")
        w.text(5, "sample", "hi")
    with metrics.MetricsWriter(str(tmp_path), total_steps=10, progress=False) as w:  # a second run appends
        w.write(6, {"loss": 2.4, "lr": 1e-3}, "train")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [
        {"step": 5, "loss": 2.5, "lr": 1e-3, "tokens_per_sec": 100.0},  # None (no MFU) is left out
        {"step": 5, "val_loss": 2.0, "val_ppl": 7.39, "sample": "hi"},
        {"step": 6, "loss": 2.4, "lr": 1e-3},
    ]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_only_the_enabled_process_writes(tmp_path):
    with metrics.MetricsWriter(str(tmp_path / "w"), total_steps=1, enabled=False) as w:
        w.write(1, {"loss": 1.0, "lr": 0.1}, "train")
        w.print("nothing")
    assert not os.path.exists(tmp_path / "w")


def test_flops_per_token_of_gpt2_124m_matches_6n_plus_attention_within_1_percent():
    # 6N + 12·L·T·D with N = all 124,439,808 parameters (embeddings included); metrics counts
    # only matmul parameters (blocks' kernels + the tied head), so the two differ by < 1%.
    gpt2 = GPT2Config.from_preset("gpt2")
    formula = 6 * 124_439_808 + 12 * 12 * 1024 * 768
    assert flops.flops_per_token(gpt2, 1024) == pytest.approx(formula, rel=0.01)
    assert flops.flops_per_token(gpt2.replace(vocab_pad_multiple=128), 1024) == pytest.approx(formula, rel=0.01)


def test_a_resumed_writer_drops_rows_logged_after_its_checkpoint(tmp_path):
    from gpt2_jax.train.metrics import MetricsWriter

    with MetricsWriter(str(tmp_path), total_steps=10, progress=False) as w:
        for step in range(1, 8):
            w.write(step, {"loss": float(step)}, "train")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # killed mid-line
    with MetricsWriter(str(tmp_path), total_steps=10, start_step=5, drop_after=5, progress=False) as w:
        w.write(6, {"loss": 60.0}, "train")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]
