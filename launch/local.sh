#!/usr/bin/env bash
# Run COMMAND as N cooperating JAX processes on this machine, each with its own CPU devices.
#
#   launch/local.sh N COMMAND [ARG ...]
#   launch/local.sh 2 python -m gpt2_jax.train --config configs/tiny.py --workdir runs/tiny2
#
# For tests and debugging multi-host code on one machine: process i gets
#   JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
#   JAX_NUM_CPU_DEVICES=$DEVICES_PER_PROCESS  JAX_PLATFORMS=cpu
# which gpt2_jax.distributed.initialize() reads. Each output line is prefixed with "[i] ".
# If a process fails, the others are stopped (SIGTERM, then SIGKILL after KILL_GRACE seconds)
# and this script exits with the failed process's status; 0 only if every process exits 0.
# (SIGKILL matters: JAX catches SIGTERM for its preemption notice and keeps waiting.)
# SIGTERM or Ctrl-C to this script is passed on as SIGTERM to every process (a trainer stops at
# a step all of them agree on and saves it; give it KILL_GRACE seconds for the save); the
# script then exits 143 (SIGTERM) or 130 (SIGINT).
#
# Variables (all optional):
#   DEVICES_PER_PROCESS  CPU devices per process (default 2)
#   COORDINATOR_PORT     port for process 0's coordinator (default: a free port)
#   LOG_DIR              also write each process's output to LOG_DIR/process_<i>.log
#   TIMEOUT              stop everything after this many seconds, exit 124 (default 0: never)
#   KILL_GRACE           seconds between SIGTERM and SIGKILL when stopping (default 5)
#   JAX_PLATFORMS        passed through; default cpu
#   GPT2_JAX_INIT_TIMEOUT, GPT2_JAX_HEARTBEAT_TIMEOUT  passed through to the processes
#                        (seconds to join; seconds of silence before a process counts as dead)
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "local.sh: error: $*" >&2; exit 2; }

if [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]]; then usage; exit 0; fi
[[ $# -ge 2 ]] || die "expected N COMMAND [ARG ...] (see launch/local.sh --help)"
N=$1; shift
[[ $N =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
[[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS must be a positive integer, got '$DEVICES_PER_PROCESS'"
TIMEOUT=${TIMEOUT:-0}
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "TIMEOUT must be a whole number of seconds, got '$TIMEOUT'"
KILL_GRACE=${KILL_GRACE:-5}
[[ $KILL_GRACE =~ ^[0-9]+$ ]] || die "KILL_GRACE must be a whole number of seconds, got '$KILL_GRACE'"
command -v "$1" >/dev/null 2>&1 || die "command not found: $1"
if [[ -n ${LOG_DIR:-} ]]; then mkdir -p "$LOG_DIR" || die "cannot create LOG_DIR $LOG_DIR"; fi

free_port() {
  local py
  py=$(command -v python3 || command -v python) || die "python is needed to pick a free port (or set COORDINATOR_PORT)"
  "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PORT=${COORDINATOR_PORT:-$(free_port)}
[[ $PORT =~ ^[0-9]+$ ]] || die "COORDINATOR_PORT must be a port number, got '$PORT'"

# Prefix each line; ignore SIGTERM so the last lines of a stopped process still get through.
prefix() {
  trap '' TERM INT
  local line log=${LOG_DIR:+$LOG_DIR/process_$1.log}
  [[ -z $log ]] || : >"$log"
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
    [[ -z $log ]] || printf '%s\n' "$line" >>"$log"
  done
}

# Job control: every process gets its own process group, so stopping one stops its children.
set -m
declare -a pids=()
for ((i = 0; i < N; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i"
    export JAX_NUM_CPU_DEVICES="$DEVICES_PER_PROCESS" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    export PYTHONUNBUFFERED=1
    "$@" 2>&1 | prefix "$i"
  ) &
  pids[i]=$!
done
set +m # the groups exist now; without job control bash does not print "Terminated" notices

stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + KILL_GRACE))
  while ((SECONDS < deadline)); do
    local alive=0
    for pid in "${pids[@]}"; do if kill -0 -- "-$pid" 2>/dev/null; then alive=1; fi; done
    ((alive)) || return 0
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
interrupted() {
  echo "local.sh: interrupted by SIG$1; stopping all processes" >&2
  stop_all
  exit "$2"
}
trap 'interrupted INT 130' INT
trap 'interrupted TERM 143' TERM

start=$SECONDS
declare -A done_status=()
while ((${#done_status[@]} < N)); do
  for ((i = 0; i < N; i++)); do
    [[ -z ${done_status[$i]:-} ]] || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    status=0
    wait "${pids[i]}" || status=$?
    done_status[$i]=$status
    if ((status != 0)); then
      echo "local.sh: process $i exited with status $status; stopping the others" >&2
      stop_all
      wait || true
      exit "$status"
    fi
  done
  if ((TIMEOUT > 0 && SECONDS - start >= TIMEOUT)); then
    echo "local.sh: TIMEOUT of ${TIMEOUT}s reached; stopping all processes" >&2
    stop_all
    wait || true
    exit 124
  fi
  sleep 0.2
done
exit 0
