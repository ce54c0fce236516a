#!/usr/bin/env bash
# Issue 8's GPU measurements, in parts that each fit one 10-minute call on a lent H100/H200.
#
#   scripts/bench_gpu.sh wheels          # here, once: download the wheels the GPU image lacks into .whl/
#   scripts/bench_gpu.sh check           # there: versions, then the fast-path tests on the GPU (cuDNN vs XLA)
#   scripts/bench_gpu.sh 124m            # there: gpt2 124M, T=1024, bf16: --compare torch first, then a batch sweep
#   scripts/bench_gpu.sh 124m_variants   # there: a profile of one step, attention=xla, loss_chunk=256
#   scripts/bench_gpu.sh medium          # there: gpt2-medium with --compare torch
#   scripts/bench_gpu.sh xl              # there: gpt2-xl with remat, batch 8, 16, 32 until one does not fit
#
# Each part appends one JSON line per bench run (bench's own line plus "label", or "label" and
# "error") to OUT_DIR/bench.jsonl, keeps each run's output in OUT_DIR/<label>.log and prints a
# table of everything in bench.jsonl last. OUT_DIR is $OUT (the device tool's folder) when set,
# else runs/bench_gpu. Where grain or ml-collections is missing, the wheels in .whl/ (carry it)
# are installed first.
# TINY=1 runs the same sequence on configs/tiny.py sizes, to check this script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
part=${1:?usage: scripts/bench_gpu.sh wheels|check|124m|124m_variants|medium|xl}
out=${OUT:-runs/bench_gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if [ "$part" = wheels ]; then  # the GPU image has JAX, flax, optax, orbax, torch, transformers; not these
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl grain==0.2.18 array-record portpicker ml-collections
fi
if ! "$PY" -c "import grain, ml_collections" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! "$PY" -c "import grain, ml_collections, tiktoken, gpt2_jax.bench" 2>"$out/imports.log"; then
  echo "error: gpt2_jax cannot be imported here ($(tail -n 1 "$out/imports.log")); carry .whl (scripts/bench_gpu.sh wheels)" >&2
  exit 2
fi

# bench LABEL [CONFIG OVERRIDES...]: one bench run; its JSON line (or its error) into bench.jsonl.
bench() {
  local label=$1 config=$2
  shift 2
  if [ -n "${TINY:-}" ]; then  # same flags, tiny sizes
    config=configs/tiny.py
    set -- "$@" --config.model.n_layer=2 --config.model.n_embd=64 --config.model.n_head=4 \
      --config.model.block_size=64 --config.model.n_positions=128 --config.batch_size=8
  fi
  echo "=== $label: python -m gpt2_jax.bench --config $config $*"
  "$PY" -m gpt2_jax.bench --config "$config" --config.sample.length=0 "$@" >"$out/$label.log" 2>&1
  local rc=$?
  BENCH_RC=$rc
  tail -n 12 "$out/$label.log" | grep -v '^{'
  LABEL=$label RC=$rc LOG="$out/$label.log" "$PY" - >>"$out/bench.jsonl" <<'EOF'
import json, os
lines = open(os.environ["LOG"]).read().splitlines()
row = {"label": os.environ["LABEL"]}
results = [l for l in lines if l.startswith("{")]  # bench's JSON line; warnings may follow it
if os.environ["RC"] == "0" and results:
    row.update(json.loads(results[-1]))
else:
    errors = [l for l in lines if l.startswith("error: ")] or lines[-1:] or ["no output"]
    row["error"] = f"exit {os.environ['RC']}: {errors[-1][:300]}"
print(json.dumps(row))
EOF
}

table() {
  "$PY" - "$out/bench.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'label':<24} {'model':>9} {'batch':>6} {'attn':>6} {'remat':>6} {'chunk':>5} {'tokens/s':>10} {'MFU':>6} "
      f"{'peak GiB':>8} {'torch tok/s':>11} {'ratio':>6}")
for r in rows:
    if "error" in r:
        print(f"{r['label']:<24} {r['error']}")
        continue
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    mem = "n/a" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
    torch = f"{r['torch_tokens_per_sec']:,.0f}" if "torch_tokens_per_sec" in r else ""
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
    print(f"{r['label']:<24} {r['n_layer']:>3}x{r['n_embd']:<5} {r['batch_size']:>6} {r['attention']:>6} "
          f"{r['remat']:>6} {r['loss_chunk']:>5} {r['tokens_per_sec']:>10,.0f} {mfu:>6} {mem:>8} {torch:>11} {ratio:>6}")
print(f"({len(rows)} runs; JSON lines in {sys.argv[1]})")
EOF
}

# gpt2 124M at T=1024 in bf16, as configs/gpt2_124m.py trains it, one optimizer step per batch.
GPT2_124M=(--config.grad_accum=1 --steps 10 --warmup 2)

case "$part" in
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
    "$PY" -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)" 2>&1 | tee -a "$out/gpu.txt"
    # On the GPU (conftest keeps a JAX_PLATFORMS that is already set): HF parity in float32 and
    # each fast path against the plain one (cuDNN attention runs only here).
    platform=cuda
    [ -n "${TINY:-}" ] && platform=cpu
    JAX_PLATFORMS=$platform "$PY" -m pytest -q -p no:cacheprovider tests/test_model.py \
      -k "hf or cudnn or auto_attention or padded or remat or chunked" 2>&1 | tee "$out/tests.log" | tail -n 15
    bench check_auto configs/gpt2_124m.py --config.batch_size=8 "${GPT2_124M[@]}"
    ;;
  124m)  # the headline first: compiled and eager torch, side by side
    bench 124m_b32_torch configs/gpt2_124m.py --config.batch_size=32 "${GPT2_124M[@]}" --compare torch
    for b in 16 64; do  # the best batch that fits (an out-of-memory run is recorded as its error)
      bench "124m_b$b" configs/gpt2_124m.py --config.batch_size=$b "${GPT2_124M[@]}"
    done
    ;;
  124m_variants)
    # where a step's time goes, per op: the tables are in 124m_b32_profile.log (the trace, too deep
    # for the device tool to bring back, stays in /tmp there)
    bench 124m_b32_profile configs/gpt2_124m.py --config.batch_size=32 "${GPT2_124M[@]}" --profile /tmp/profile_124m
    bench 124m_b32_xla configs/gpt2_124m.py --config.batch_size=32 --config.model.attention=xla "${GPT2_124M[@]}"
    bench 124m_b32_chunk256 configs/gpt2_124m.py --config.batch_size=32 --config.model.loss_chunk=256 "${GPT2_124M[@]}"
    ;;
  medium)
    bench medium_b16_torch configs/gpt2_350m.py --config.batch_size=16 --config.grad_accum=1 --steps 10 --warmup 2 \
      --compare torch
    ;;
  xl)
    for b in 8 16 32; do  # the largest micro-batch that fits: stop at the first that does not
      bench "xl_b${b}_remat" configs/gpt2_1558m.py --config.batch_size=$b --config.grad_accum=1 \
        --config.model.remat=full --config.model.loss_chunk=256 --steps 5 --warmup 2
      [ "$BENCH_RC" = 0 ] || break
    done
    ;;
  *)
    echo "error: unknown part '$part'; use wheels, check, 124m, 124m_variants, medium or xl" >&2
    exit 2
    ;;
esac
table
