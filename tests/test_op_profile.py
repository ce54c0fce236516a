"""op_profile: time per XLA op from a profiler trace; bench --profile on the tiny config."""

import gzip
import json
import os

import pytest

from gpt2_jax.cli import run
from gpt2_jax.tools import bench, op_profile
from gpt2_jax.tools.op_profile import OpTime


def _write(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(path)


def _meta(pid, process, threads):
    out = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}]
    out += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}} for tid, name in threads.items()]
    return out


def _op(name, dur, pid=1, tid=1):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur}


def test_cpu_traces_count_xla_ops_and_skip_host_bookkeeping(tmp_path):
    path = _write(tmp_path / "t.trace.json.gz", [
        *_meta(1, "/host:CPU", {1: "tf_XLAEigen/1", 2: "python"}),
        _op("ThunkExecutor::Execute", 9_000), _op("$api.py:2479 block_until_ready", 9_000, tid=2),
        _op("SlinkyThreadPool::Await", 500),
        _op("ynn_fusion.3", 2_000), _op("ynn_fusion.12", 1_000), _op("ynn_fusion.3", 500),
        _op("copy_bitcast_fusion", 250), _op("wrapped_is-finite", 250),
        _op("while.4", 3_000),  # a loop's time is its body's ops, already counted
    ])  # fmt: skip
    ops = op_profile.op_times(path)
    assert ops == [OpTime("ynn_fusion.3", 2.5, 2), OpTime("ynn_fusion.12", 1.0, 1),
                   OpTime("copy_bitcast_fusion", 0.25, 1), OpTime("wrapped_is-finite", 0.25, 1)]  # fmt: skip
    assert op_profile.by_kind(ops)[0] == OpTime("ynn_fusion", 3.5, 3)
    text = op_profile.table(ops, top=2)
    assert text.splitlines()[1].split() == ["ynn_fusion.3", "2.5", "62.5%", "2"]
    assert text.splitlines()[-1].split() == ["all", "4", "4.0", "100.0%"]


def test_device_traces_use_the_xla_ops_line_else_the_streams_named_by_hlo_op(tmp_path):
    host = [*_meta(1, "/host:CPU", {1: "python"}), _op("fusion.1", 7_000)]  # host-side launch, not device time
    device = _meta(2, "/device:GPU:0", {10: "Stream #13(Compute)", 11: "XLA Ops", 12: "XLA Modules"})
    kernels = [_op("void cutlass::Kernel2<sm90_gemm>(Params)", 900, pid=2, tid=10), _op("loop_fusion_3", 100, pid=2, tid=10)]
    kernels[0]["args"] = {"hlo_op": "dot.5", "hlo_module": "jit__train_step"}
    xla_ops = [_op("dot.5", 900, pid=2, tid=11), _op("loop_fusion.3", 100, pid=2, tid=11)]
    module = [_op("jit__train_step", 1_000, pid=2, tid=12)]  # spans the whole step: never counted
    with_line = op_profile.op_times(_write(tmp_path / "a.trace.json.gz", host + device + kernels + xla_ops + module))
    assert with_line == [OpTime("dot.5", 0.9, 1), OpTime("loop_fusion.3", 0.1, 1)]
    # without an "XLA Ops" line: the stream lines, each kernel named by its XLA op where the trace says
    no_ops_line = [e for e in device if e.get("tid") != 11]
    without = op_profile.op_times(_write(tmp_path / "b.trace.json.gz", host + no_ops_line + kernels + module), True)
    assert without == [OpTime("dot.5", 0.9, 1), OpTime("loop_fusion_3", 0.1, 1)]
    # an accelerator run whose trace has no device events is an error, not host launches as op times
    with pytest.raises(op_profile.NoDeviceEvents, match="no device events"):
        op_profile.op_times(_write(tmp_path / "c.trace.json.gz", host), device=True)


def test_bench_profile_traces_one_step_and_prints_its_ops(tmp_path, capsys):
    argv = ["--config", "configs/tiny.py", "--config.batch_size=8", "--config.model.block_size=32",
            "--config.sample.length=0", "--steps", "1", "--warmup", "1", "--profile", str(tmp_path / "prof")]  # fmt: skip
    assert run(bench.main, argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    trace = out["profile_trace"]
    assert trace.startswith(str(tmp_path / "prof")) and os.path.isfile(trace)
    ops = op_profile.op_times(trace)
    assert ops and all(op_profile.XLA_OP_NAME.match(op.name) and op.ms > 0 for op in ops)
    text = "\n".join(lines)
    assert f"one gpt2_jax step, traced ({trace}):" in text and "op kind" in text
    # the step's matmuls are in it: the summed time is a real share of the measured step
    assert sum(op.ms for op in ops) > 0.2 * out["step_ms"]
    assert pytest.approx(out["tokens_per_sec"], rel=1e-12) == out["tokens_per_step"] / (out["step_ms"] / 1e3)
