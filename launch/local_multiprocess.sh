#!/usr/bin/env bash
# Runs NPROC copies of a command on this machine as one multi-process JAX job over loopback.
#
#   launch/local_multiprocess.sh [options] NPROC -- <command...>
#   launch/local_multiprocess.sh --cpu-devices 4 2 -- \
#       python -m lfi_jax.train --config=configs/demo.py:ivit,runlocal --workdir=runs/mp
#
# Each process gets LFI_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port unless --port),
# LFI_NUM_PROCESSES=NPROC and LFI_PROCESS_ID=i, which `lfi_jax.distributed.maybe_initialize`
# turns into `jax.distributed.initialize` (process 0 hosts the coordinator, bound to
# 127.0.0.1 only). Output lines are prefixed with "[i] ". When one process exits non-zero
# the others are stopped (SIGTERM, then SIGKILL after --grace seconds) and the launcher
# exits with that status; Ctrl-C / SIGTERM to the launcher stops all of them.
#
# Options:
#   --cpu-devices N       each process sees N CPU devices (sets JAX_NUM_CPU_DEVICES=N and
#                         JAX_PLATFORMS=cpu): a multi-host run simulated on one machine
#   --gpus-per-process K  process i sees GPUs i*K .. i*K+K-1 (sets CUDA_VISIBLE_DEVICES)
#   --port P              coordinator port (default: a free one)
#   --log-dir DIR         also write each process's output to DIR/process_<i>.log
#   --grace S             seconds between SIGTERM and SIGKILL when stopping (default 10)
#   --dry-run             print the commands instead of running them
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

cpu_devices="" gpus_per_process="" port="" log_dir="" grace=10 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --gpus-per-process) gpus_per_process="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) echo "local_multiprocess.sh: NPROC is missing before --" >&2; usage ;;
    -*) echo "local_multiprocess.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -ge 3 && "$2" == "--" ]] || { echo "local_multiprocess.sh: expected NPROC -- <command...>" >&2; usage; }
nproc="$1"; shift 2
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "local_multiprocess.sh: NPROC must be a positive integer, got '$nproc'" >&2; exit 2; }
for v in cpu_devices gpus_per_process port grace; do
  val="${!v}"
  [[ -z "$val" || "$val" =~ ^[0-9]+$ ]] || { echo "local_multiprocess.sh: --${v//_/-} must be an integer, got '$val'" >&2; exit 2; }
done

if [[ -z "$port" ]]; then
  py="${PYTHON:-python3}"
  command -v "$py" >/dev/null 2>&1 || py=python
  port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
fi
addr="127.0.0.1:${port}"

env_for() {  # the environment assignments of process $1, one per line
  local i="$1"
  echo "LFI_COORDINATOR_ADDRESS=${addr}"
  echo "LFI_NUM_PROCESSES=${nproc}"
  echo "LFI_PROCESS_ID=${i}"
  if [[ -n "$cpu_devices" ]]; then
    echo "JAX_PLATFORMS=cpu"
    echo "JAX_NUM_CPU_DEVICES=${cpu_devices}"
  fi
  if [[ -n "$gpus_per_process" ]]; then
    local ids="" g
    for ((g = i * gpus_per_process; g < (i + 1) * gpus_per_process; g++)); do ids+="${ids:+,}$g"; done
    echo "CUDA_VISIBLE_DEVICES=${ids}"
  fi
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < nproc; i++)); do
    mapfile -t assigns < <(env_for "$i")
    printf 'env'; printf ' %q' "${assigns[@]}" "$@"; printf '\n'
  done
  exit 0
fi

[[ -z "$log_dir" ]] || mkdir -p "$log_dir"
pids=()
stop_all() {  # SIGTERM every live process, SIGKILL what is left after the grace period
  local pid waited=0
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  while (( waited < grace * 10 )); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.1; waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "local_multiprocess.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < nproc; i++)); do
  mapfile -t assigns < <(env_for "$i")
  if [[ -n "$log_dir" ]]; then
    ( exec env "${assigns[@]}" "$@" > >(tee "$log_dir/process_$i.log" | sed -u "s/^/[$i] /") 2>&1 ) &
  else
    ( exec env "${assigns[@]}" "$@" > >(sed -u "s/^/[$i] /") 2>&1 ) &
  fi
  pids+=("$!")
done
echo "local_multiprocess.sh: started $nproc processes (coordinator $addr): pids ${pids[*]}" >&2

live=("${pids[@]}")
status=0
while (( ${#live[@]} > 0 )); do
  finished=""
  set +e
  wait -n -p finished "${live[@]}"
  rc=$?
  set -e
  if [[ -z "$finished" ]]; then
    (( rc == 127 )) && break  # nothing left to wait for
    continue
  fi
  rest=()
  for pid in "${live[@]}"; do [[ "$pid" == "$finished" ]] || rest+=("$pid"); done
  live=("${rest[@]}")
  if (( rc != 0 )); then
    idx=0
    for ((j = 0; j < nproc; j++)); do [[ "${pids[$j]}" == "$finished" ]] && idx=$j; done
    echo "local_multiprocess.sh: process $idx (pid $finished) exited with status $rc; stopping the others" >&2
    status=$rc
    stop_all
    break
  fi
done
wait 2>/dev/null || true  # the output filters
exit "$status"
