#!/usr/bin/env bash
# Run COMMAND on every host of a Cloud TPU VM slice: create the slice (or reuse it), install this
# checkout on all workers, run the same command on --worker=all, and stream worker 0's output.
#
#   TPU_NAME=gpt2 ZONE=us-west4-a launch/tpu_pod.sh COMMAND [ARG ...]
#   TPU_NAME=gpt2 ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 SPOT=1 RETRIES=5 \
#     launch/tpu_pod.sh python -m gpt2_jax.train --config configs/gpt2_124m.py \
#       --workdir gs://my-bucket/runs/gpt2_124m
#
# On a TPU VM, gpt2_jax.distributed.initialize() gets the hosts from the slice's metadata
# through JAX; no flags are needed. Each worker writes its output to ~/gpt2_jax/logs/run.log;
# worker 0's is printed here. Exit status: non-zero if the command failed on any worker.
#
# Spot / preemptible slices: a preempted slice is deleted and created again, and the same command
# runs again, up to RETRIES times. The trainer resumes from the latest checkpoint in the workdir,
# so the workdir must outlive the VMs and be visible to every worker (a gs:// bucket, or a
# Filestore/NFS mount on all workers); a folder on the VM's own disk is lost with it.
# Re-running this script by hand after a preemption does the same.
#
# Variables:
#   TPU_NAME          slice name (required)
#   ZONE              zone (required), e.g. us-west4-a (v5e), us-central2-b (v4)
#   ACCELERATOR_TYPE  slice type when creating (default v5litepod-16: 4 hosts x 4 chips)
#   RUNTIME_VERSION   TPU software version when creating (default v2-alpha-tpuv5-lite; v4: tpu-ubuntu2204-base)
#   PROJECT           Google Cloud project (default: gcloud's configured project)
#   SPOT              1: create a spot slice (default 0); PREEMPTIBLE=1 for the older preemptible kind
#   RETRIES           times to recreate a preempted slice and run again (default 0)
#   JAX_PACKAGE       what pip installs for JAX on the workers (default "jax[tpu]")
#   SKIP_INSTALL      1: do not copy/install the checkout (it is already there)
#   REMOTE_DIR        where the checkout goes on the workers (default gpt2_jax, in the home folder)
#   DELETE_AT_END     1: delete the slice after a successful run (default 0)
#
# Not run here: the development machine has no Google Cloud credentials or TPUs. Checked with
# ShellCheck only; the pieces it relies on (TPU detection in gpt2_jax.parallel.distributed, resume from a
# workdir) are tested on CPU.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }
say() { echo "tpu_pod.sh: $*" >&2; }

if [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]]; then usage; exit 0; fi
[[ $# -ge 1 ]] || die "expected COMMAND [ARG ...] (see launch/tpu_pod.sh --help)"
[[ -n ${TPU_NAME:-} ]] || die "set TPU_NAME, the slice's name"
[[ -n ${ZONE:-} ]] || die "set ZONE, e.g. ZONE=us-west4-a"
command -v gcloud >/dev/null 2>&1 || die "gcloud not found; install the Google Cloud CLI and run gcloud auth login"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
RETRIES=${RETRIES:-0}
[[ $RETRIES =~ ^[0-9]+$ ]] || die "RETRIES must be a whole number, got '$RETRIES'"
JAX_PACKAGE=${JAX_PACKAGE:-jax[tpu]}
REMOTE_DIR=${REMOTE_DIR:-gpt2_jax}
REPO=$(cd "$(dirname "$0")/.." && pwd)

gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then where+=(--project="$PROJECT"); fi

state() { "${gc[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null || true; }

create() {
  local kind=()
  if [[ ${SPOT:-0} == 1 ]]; then kind=(--spot); elif [[ ${PREEMPTIBLE:-0} == 1 ]]; then kind=(--preemptible); fi
  say "creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION${kind[*]:+, ${kind[*]}}) in $ZONE"
  "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${kind[@]}"
}

# Make sure the slice exists and is READY: create it, recreate it if preempted, wait if busy.
ensure_slice() {
  local s
  for _ in $(seq 1 120); do
    s=$(state)
    case $s in
      READY) return 0 ;;
      "") create ;;
      PREEMPTED | TERMINATED | FAILED)
        say "$TPU_NAME is $s; deleting it and creating it again"
        "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
        create ;;
      *) say "$TPU_NAME is $s; waiting"; sleep 30 ;;
    esac
  done
  die "$TPU_NAME did not become READY (last state: ${s:-none})"
}

on_all() { "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"; }

install() {
  local tarball
  tarball=$(mktemp "${TMPDIR:-/tmp}/gpt2_jax.XXXXXX.tar.gz")
  # the tracked files of this checkout, as they are now (uncommitted edits included)
  git -C "$REPO" ls-files -z | tar --null -czf "$tarball" -C "$REPO" -T -
  say "copying the checkout to all workers and installing it"
  "${gc[@]}" scp "$tarball" "$TPU_NAME:gpt2_jax.tar.gz" "${where[@]}" --worker=all
  rm -f "$tarball"
  on_all "set -e; mkdir -p $(printf '%q' "$REMOTE_DIR")/logs; tar -xzf gpt2_jax.tar.gz -C $(printf '%q' "$REMOTE_DIR");
    python3 -m pip install -q -U $(printf '%q' "$JAX_PACKAGE") -e $(printf '%q' "$REMOTE_DIR")"
}

# The same command on every worker; worker 0 (from the TPU metadata) echoes its log here.
run() {
  local cmd q
  q=$(printf '%q ' "$@")
  cmd="cd $(printf '%q' "$REMOTE_DIR") && export PYTHONUNBUFFERED=1 &&
    id=\$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) &&
    if [ \"\$id\" = 0 ]; then $q 2>&1 | tee logs/run.log; exit \${PIPESTATUS[0]}; else $q > logs/run.log 2>&1; fi"
  on_all "$cmd"
}

command -v git >/dev/null 2>&1 || [[ ${SKIP_INSTALL:-0} == 1 ]] || die "git is needed to package the checkout (or SKIP_INSTALL=1)"
attempt=0
while true; do
  ensure_slice
  if [[ ${SKIP_INSTALL:-0} != 1 ]]; then install; fi
  status=0
  run "$@" || status=$?
  if ((status == 0)); then break; fi
  s=$(state)
  if [[ $s != READY ]] && ((attempt < RETRIES)); then
    attempt=$((attempt + 1))
    say "run stopped with status $status and $TPU_NAME is ${s:-gone} (preempted?); attempt $attempt of $RETRIES: recreating and resuming"
    continue
  fi
  say "run failed with status $status (slice state: ${s:-gone}); worker logs: $REMOTE_DIR/logs/run.log on each worker"
  exit "$status"
done
if [[ ${DELETE_AT_END:-0} == 1 ]]; then
  say "deleting $TPU_NAME"
  "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
fi
