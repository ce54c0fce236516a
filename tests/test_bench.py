"""bench: the real train step timed on the tiny config; its bookkeeping (tokens/s, FLOPs, MFU,
ratio) is checked against the JSON line it prints; user errors are one line and exit 2."""

import json

import jax
import pytest

from gpt2_jax.cli import TRAINING_MEMORY_HINT, run
from gpt2_jax.model import GPT2Config
from gpt2_jax.tools import bench
from gpt2_jax.train import flops

TINY = ["--config", "configs/tiny.py", "--config.batch_size=16", "--config.model.block_size=32",
        "--config.sample.length=0", "--steps", "2", "--warmup", "1"]  # fmt: skip


def _run(capsys, argv):
    assert run(bench.main, argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1]), "\n".join(out[:-1])


def test_json_line_bookkeeping(capsys):
    out, table = _run(capsys, [*TINY, "--config.grad_accum=2"])
    tokens_per_step = 16 * 32
    assert out["tokens_per_step"] == tokens_per_step and out["grad_accum"] == 2
    assert out["tokens_per_sec"] == pytest.approx(tokens_per_step / (out["step_ms"] / 1e3), rel=1e-12)
    config = GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4, vocab_pad_multiple=128)
    assert out["flops_per_token"] == flops.flops_per_token(config, 32)
    assert out["model_tflops"] == pytest.approx(out["tokens_per_sec"] * out["flops_per_token"] / 1e12, rel=1e-12)
    peak = flops.total_peak_flops(jax.devices(), "float32")
    if peak is None:
        assert out["mfu"] is None
    else:
        assert out["mfu"] == pytest.approx(out["model_tflops"] * 1e12 / peak, rel=1e-12)
    assert out["device"] == f"{jax.device_count()} x cpu"
    assert 4.0 < out["loss"] < 12.0  # a real loss of random tokens over a 50257 vocabulary (ln = 10.8)
    assert "gpt2_jax" in table and "tokens/s" in table and "torch" not in table


def test_compare_torch_reports_both_and_their_ratio(capsys):
    pytest.importorskip("transformers")
    out, table = _run(capsys, [*TINY, "--compare", "torch"])
    assert out["torch_implementation"] == "eager" and out["torch_device"].startswith("cpu")
    assert out["torch_tokens_per_sec"] == pytest.approx(out["tokens_per_step"] / (out["torch_step_ms"] / 1e3), rel=1e-12)
    assert out["ratio"] == pytest.approx(out["tokens_per_sec"] / out["torch_tokens_per_sec"], rel=1e-12)
    assert "hf_torch_eager" in table


def test_bench_times_the_step_train_compiles_for_loader_batches(shards):
    """The synthetic batch has the loader's keys, dtypes and shapes (pretraining batches carry
    float32 all-ones weights), so the step bench times is the HLO that train runs."""
    from gpt2_jax.data import loader
    from gpt2_jax.parallel import sharding
    from gpt2_jax.train import steps
    from gpt2_jax.train.plan import plan
    from gpt2_jax.train.trainer import Trainer

    c, _ = bench.parse_args([*TINY, "--config.grad_accum=2"])
    p = plan(c, data=False)
    real = next(loader.make_train_iterator(shards, block_size=p.block_size, global_batch_size=c.batch_size, seed=0))
    synthetic = bench.synthetic_tokens(c, p, c.batch_size)
    assert {k: (v.dtype, v.shape) for k, v in synthetic.items()} == {k: (v.dtype, v.shape) for k, v in real.items()}
    assert (synthetic["weights"] == 1).all()
    with sharding.use_mesh(p.mesh, p.rules):
        trainer = Trainer(c, p)
        theirs = loader.to_global_batch(steps.split_microbatches(real, c.grad_accum), trainer.train_batch_sharding)
        ours = bench.train_batch(c, p, trainer)
        assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype, x.sharding), ours) == \
            jax.tree_util.tree_map(lambda x: (x.shape, x.dtype, x.sharding), theirs)  # fmt: skip
        hlo = [trainer.train_fn.lower(trainer.abstract_state, b).as_text() for b in (ours, theirs)]
    assert hlo[0] == hlo[1]


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/tiny.py", "--config.batch_sise=8"], "unknown config key 'batch_sise'"),
    ([*TINY, "--steps", "0"], "--steps must be >= 1"),
    (["--config", "configs/tiny.py", "--config.batch_size=9", "--config.grad_accum=2"], "divisible by grad_accum"),
    (["--steps", "3"], "--config FILE is required"),
    (["--config", "configs/tiny.py", "--compare", "jax"], "invalid choice"),
])
def test_user_errors_are_one_line(capsys, argv, message):
    assert run(bench.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_torch_is_a_clear_error(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kw):
        if name == "torch":
            raise ImportError("No module named 'torch'", name="torch")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert run(bench.main, [*TINY, "--compare", "torch"]) == 2
    assert "pip install torch" in capsys.readouterr().err


def test_out_of_device_memory_is_one_line_that_says_what_to_change(capsys, monkeypatch):
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 13207863296 bytes.\n"
                                     "BufferAssignment OOM Debugging.\n...")  # fmt: skip

    def raise_(*args, **kwargs):
        raise oom

    monkeypatch.setattr(bench, "time_jax", raise_)
    assert run(bench.main, TINY, memory_hint=TRAINING_MEMORY_HINT) == 2
    err = capsys.readouterr().err
    assert err == (f"error: out of device memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                   f"13207863296 bytes.); {TRAINING_MEMORY_HINT}\n")  # fmt: skip
    # any other runtime error is a bug: it keeps its traceback
    monkeypatch.setattr(bench, "time_jax", lambda *a, **k: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: x")))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        run(bench.main, TINY, memory_hint=TRAINING_MEMORY_HINT)
