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
# runs again, up to RETRIES times; a failed create (no spot capacity) and a slice lost during the
# copy or the install count as tries too. A slice this script (re)creates has fresh disks, so the
# checkout is installed on it even with SKIP_INSTALL=1. Whether a failed command means a lost slice
# is decided from the slice's state over SETTLE_CHECKS looks POLL_SECONDS apart (right after ssh
# drops, describe may still say READY): READY throughout means the command itself failed, and the
# script stops with its status. The trainer resumes from the latest checkpoint in the workdir,
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
#   SKIP_INSTALL      1: do not copy/install the checkout on a slice that already exists (it is there)
#   REMOTE_DIR        where the checkout goes on the workers (default gpt2_jax, in the home folder)
#   DELETE_AT_END     1: delete the slice after a successful run (default 0)
#   POLL_SECONDS      seconds between looks at the slice's state, and after a failed create (default 30)
#   SETTLE_CHECKS     looks at the state after a failure before deciding it (default 4)
#
# Not run against Google Cloud: the development machine has no credentials or TPUs. Tested with a
# fake gcloud on PATH (tests/test_launch_gcloud.py: create, reuse, recreate after preemption,
# failed create, preemption during install, give-up); the pieces it relies on (TPU detection in
# gpt2_jax.parallel.distributed, resume from a workdir) are tested on CPU.
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
POLL_SECONDS=${POLL_SECONDS:-30}
SETTLE_CHECKS=${SETTLE_CHECKS:-4}
[[ $POLL_SECONDS =~ ^[0-9]+$ ]] || die "POLL_SECONDS must be a whole number, got '$POLL_SECONDS'"
[[ $SETTLE_CHECKS =~ ^[1-9][0-9]*$ ]] || die "SETTLE_CHECKS must be a whole number >= 1, got '$SETTLE_CHECKS'"
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
# Returns non-zero when a create or delete fails (e.g. no spot capacity): the caller may retry.
# Sets fresh=1 when it created the slice (new disks: nothing installed).
ensure_slice() {
  local s
  for _ in $(seq 1 120); do
    s=$(state)
    case $s in
      READY) return 0 ;;
      "") create || return 1; fresh=1 ;;
      PREEMPTED | TERMINATED | FAILED)
        say "$TPU_NAME is $s; deleting it and creating it again"
        "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet || return 1
        create || return 1; fresh=1 ;;
      *) say "$TPU_NAME is $s; waiting"; sleep "$POLL_SECONDS" ;;
    esac
  done
  say "$TPU_NAME did not become READY (last state: ${s:-none})"
  return 1
}

# The slice's state once it has settled: the first state other than READY seen in SETTLE_CHECKS
# looks, or READY. A preempted slice can still describe as READY just after its ssh drops.
settled_state() {
  local s i
  for ((i = 1; i <= SETTLE_CHECKS; i++)); do
    s=$(state)
    if [[ $s != READY ]]; then echo "$s"; return; fi
    if ((i < SETTLE_CHECKS)); then sleep "$POLL_SECONDS"; fi
  done
  echo READY
}

on_all() { "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"; }

# Called as `install || ...`, where set -e does not act: each step checks its own status.
install() {
  local tarball status=0
  tarball=$(mktemp "${TMPDIR:-/tmp}/gpt2_jax.XXXXXX.tar.gz") || return 1
  # the tracked files of this checkout, as they are now (uncommitted edits included)
  git -C "$REPO" ls-files -z | tar --null -czf "$tarball" -C "$REPO" -T - || { rm -f "$tarball"; die "could not package the checkout $REPO"; }
  say "copying the checkout to all workers and installing it"
  "${gc[@]}" scp "$tarball" "$TPU_NAME:gpt2_jax.tar.gz" "${where[@]}" --worker=all || status=$?
  rm -f "$tarball"
  ((status == 0)) || return "$status"
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
# After a failed step: go round again (return 0) if the slice is gone and tries are left, else exit.
retry_or_exit() {
  local status=$1 what=$2 s
  s=$(settled_state)
  if [[ $s != READY ]] && ((attempt < RETRIES)); then
    attempt=$((attempt + 1))
    say "$what stopped with status $status and $TPU_NAME is ${s:-gone} (preempted?); attempt $attempt of $RETRIES: recreating and resuming"
    return 0
  fi
  say "$what failed with status $status (slice state: ${s:-gone}); worker logs: $REMOTE_DIR/logs/run.log on each worker"
  exit "$status"
}

fresh=0
while true; do
  if ! ensure_slice; then
    if ((attempt < RETRIES)); then
      attempt=$((attempt + 1))
      say "could not get $TPU_NAME READY (spot capacity?); attempt $attempt of $RETRIES in $POLL_SECONDS s"
      sleep "$POLL_SECONDS"
      continue
    fi
    say "could not get $TPU_NAME READY; giving up after $attempt retries"
    exit 1
  fi
  if [[ ${SKIP_INSTALL:-0} != 1 || $fresh == 1 ]]; then
    if [[ $fresh == 1 && ${SKIP_INSTALL:-0} == 1 ]]; then say "$TPU_NAME was created anew: installing despite SKIP_INSTALL=1"; fi
    status=0
    install || status=$?
    if ((status != 0)); then retry_or_exit "$status" "copy/install"; continue; fi
    fresh=0
  fi
  status=0
  run "$@" || status=$?
  if ((status == 0)); then break; fi
  retry_or_exit "$status" "run"
done
if [[ ${DELETE_AT_END:-0} == 1 ]]; then
  say "deleting $TPU_NAME"
  "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
fi
