"""FSDP in the compiled train step: kernels gathered in the compute dtype, inside the gradient-accumulation
loop, never carried whole through it; on a TPU slice (libtpu), per-chip peak memory falls as fsdp grows.

The checks read the compiled program (compile().as_text()) against the parameters' own shapes and
shardings from the train state, so they hold whatever the parameter tree is named or stacked as.
"""

import dataclasses
import glob
import math
import re

import jax
import numpy as np
from runs import tiny

from gpt2_jax.parallel import sharding
from gpt2_jax.train import plan as plan_lib
from gpt2_jax.train.trainer import Trainer

# A 2-layer, n_embd 64 GPT-2 in bfloat16, 4 microbatches per step. Its sizes keep the kernels'
# element counts apart from the embeddings' (checked below), so a buffer's size says what it is.
SETTINGS = {"dtype": "bfloat16", "grad_accum": 4, "batch_size": 32, "model.block_size": 32, "model.vocab_size": 384,
            "model.attention": "xla", "mesh.tensor": 1}  # fmt: skip
SHAPE = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")


def _config(fsdp: int, data: int):
    return tiny("", **SETTINGS, **{"mesh.fsdp": fsdp, "mesh.data": data})


def _compile(c, devices=None, dump_dir=None):
    """(trainer, compiled train step) for config `c`, on `devices` (default: the local ones)."""
    p = plan_lib.plan(c, data=False)
    if devices is not None:
        shape = dict(p.mesh.shape)
        p = dataclasses.replace(p, mesh=sharding.make_mesh((len(devices) // shape["fsdp"], shape["fsdp"], 1), devices))
    with sharding.use_mesh(p.mesh, p.rules):
        trainer = Trainer(c, p)
        micro = (c.grad_accum, c.batch_size // c.grad_accum, p.block_size)
        batch = {k: jax.ShapeDtypeStruct(micro, dtype, sharding=trainer.train_batch_sharding)
                 for k, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}  # fmt: skip
        lowered = trainer.train_fn.lower(trainer.abstract_state, batch)
        options = {"xla_dump_to": dump_dir, "xla_dump_hlo_pass_re": "pipeline-start"} if dump_dir else None
        return trainer, lowered.compile(options)


def _sizes(trainer):
    """(element counts of whole sharded kernels, of whole sharded matrices incl. embeddings),
    from the state: only parameters FSDP actually splits count."""
    shard = lambda a: math.prod(a.sharding.shard_shape(a.shape))  # noqa: E731
    split = [(path, a) for path, a in jax.tree_util.tree_flatten_with_path(trainer.abstract_state.params)[0]
             if a.ndim >= 2 and shard(a) < a.size]  # fmt: skip
    matrices = {a.size for _, a in split}
    kernels = {a.size for path, a in split if getattr(path[-1], "key", None) == "kernel"}
    # A size shared by a whole matrix and some shard (c_fc's quarter is c_proj's whole at fsdp 4)
    # or by a kernel and an embedding says nothing: leave those sizes out.
    ambiguous = {shard(a) for a in jax.tree_util.tree_leaves(trainer.abstract_state)} | (kernels & (matrices - kernels))
    kernels, matrices = kernels - ambiguous, matrices - ambiguous
    assert kernels, "test setup: every kernel's size is also some shard's"
    return kernels, matrices


def _computations(hlo: str):
    """HLO text -> {computation name: its lines}; the entry computation is 'ENTRY'."""
    out, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) \(", line)
        if m:
            name = "ENTRY" if m.group(1) else m.group(2)
        elif name:
            out.setdefault(name, []).append(line)
    return out


def _result_shapes(line: str, op: str) -> list[tuple[str, int]]:
    """(dtype, element count) of each array an instruction `... = TYPE op(...)` produces."""
    result = line.split(" = ", 1)[1].split(f" {op}(", 1)[0]
    return [(dt, math.prod(int(d) for d in dims.split(",") if d)) for dt, dims in SHAPE.findall(result)]


def _all_gathers(hlo: str):
    """(computation, dtype, element count) of every array an all-gather (sync or async start) makes."""
    for comp, lines in _computations(hlo).items():
        for line in lines:
            op = next((o for o in ("all-gather-start", "all-gather") if f" {o}(" in line), None)
            if op and " = " in line:
                yield from ((comp, dt, n) for dt, n in _result_shapes(line, op))


def _loop_carries(hlo: str):
    """(dtype, element count) of every buffer any while loop carries from one iteration to the next."""
    for line in hlo.splitlines():
        if " while(" in line and " = " in line:
            yield from _result_shapes(line, "while")


def _check(trainer, partitioned_hlo: str, final_hlo: str):
    """Kernels are all-gathered in bfloat16 (read in `partitioned_hlo`), inside the loop, and no
    loop carries a whole (gathered) parameter (both read in the final program)."""
    kernels, matrices = _sizes(trainer)
    dtypes = {dt for _, dt, n in _all_gathers(partitioned_hlo) if n in kernels}
    assert dtypes == {"bf16"}, f"kernels all-gathered as {sorted(dtypes)} (none found if empty)"
    places = {comp for comp, _, n in _all_gathers(final_hlo) if n in kernels}
    assert places and "ENTRY" not in places, "kernels all-gathered outside the accumulation loop"
    carried = [(dt, n) for dt, n in _loop_carries(final_hlo) if n in matrices and dt in ("f32", "bf16")]
    assert not carried, f"whole parameters carried through the accumulation loop: {carried}"


def test_cpu_fsdp_gathers_kernels_in_bf16_per_microbatch_and_carries_only_shards(tmp_path):
    trainer, compiled = _compile(_config(fsdp=8, data=1), dump_dir=str(tmp_path))
    # XLA:CPU widens bf16 collectives to f32 late (its float-normalization-bf16 pass), so the
    # gathers' dtype is read from the program as the SPMD partitioner left it.
    (partitioned,) = glob.glob(str(tmp_path / "*spmd-cleanup.after_pipeline-start*.txt"))
    with open(partitioned) as f:
        _check(trainer, f.read(), compiled.as_text())


# The same check for a v5e 2x2 slice is in tests/test_tpu_compile.py: libtpu loaded in this process
# would change what later in-process profiles (tests/test_op_profile.py) see.
