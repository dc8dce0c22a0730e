#!/usr/bin/env bash
# Cloud TPU VM runs with gcloud: create the slice, ship this checkout to every worker, install,
# train on all workers at once, follow the log, stop, delete.
#
#   launch/tpu_vm.sh [options] create
#   launch/tpu_vm.sh [options] setup                 # this checkout (git HEAD) + venv on every worker
#   launch/tpu_vm.sh [options] mount BUCKET [DIR]    # gcsfuse BUCKET at DIR (default /mnt/lfi-runs) on every worker
#   launch/tpu_vm.sh [options] train -- <lfi_jax.train flags>
#   launch/tpu_vm.sh [options] logs [WORKER]         # tail -f the train log of a worker (default 0)
#   launch/tpu_vm.sh [options] run -- <shell command> # any command on every worker
#   launch/tpu_vm.sh [options] stop                  # stop training on every worker
#   launch/tpu_vm.sh [options] delete
#
# Every worker runs the same `python -m lfi_jax.train ...` with LFI_DISTRIBUTED=auto, so JAX
# finds the coordinator, the process count and each worker's id from the TPU metadata. The
# --workdir must be one directory every worker sees (a gcsfuse mount or NFS), given as an
# absolute path: each process writes its own part of every checkpoint there and process 0
# writes metrics and summaries.
#
# Options (environment variables in brackets):
#   --name NAME          TPU VM name [TPU_NAME, default lfi-jax]
#   --zone ZONE          [TPU_ZONE, default us-central2-b]
#   --project PROJECT    [TPU_PROJECT, default: gcloud's configured project]
#   --type TYPE          accelerator type [TPU_TYPE, default v4-32]
#   --version VERSION    runtime version [TPU_VERSION, default tpu-ubuntu2204-base]
#   --spot               create a Spot VM
#   --jax-version V      jax[tpu] version installed by setup [JAX_VERSION, default 0.10.2]
#   --remote-dir DIR     checkout location on the workers [default ~/lfi-jax]
#   --dry-run            print the commands (one per line, shell-quoted) instead of running them
set -euo pipefail

name="${TPU_NAME:-lfi-jax}"
zone="${TPU_ZONE:-us-central2-b}"
project="${TPU_PROJECT:-}"
tpu_type="${TPU_TYPE:-v4-32}"
version="${TPU_VERSION:-tpu-ubuntu2204-base}"
jax_version="${JAX_VERSION:-0.10.2}"
remote_dir="~/lfi-jax"
spot=0 dry_run=0
repo="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type) tpu_type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --jax-version) jax_version="$2"; shift 2 ;;
    --remote-dir) remote_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage
cmd="$1"; shift
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name' must be lower-case letters, digits and dashes"

# Shell-quote one word only where needed, so printed commands stay readable and exact.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%~^-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local first=1 a; for a in "$@"; do ((first)) || printf ' '; first=0; q "$a"; done; }
do_cmd() {  # run, or print under --dry-run
  if ((dry_run)); then quote_all "$@"; printf '\n'; else "$@"; fi
}

where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")
on_workers() {  # on_workers WORKER REMOTE_COMMAND
  do_cmd gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

venv="~/lfi-venv"
log="~/lfi-train.log"
pidfile="~/lfi-train.pid"
case "$cmd" in
  create)
    args=(gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$tpu_type" --version="$version")
    ((spot)) && args+=(--spot)
    do_cmd "${args[@]}"
    ;;
  setup)
    tarball="/tmp/lfi-jax-src-${name}.tar.gz"
    if ((! dry_run)) && [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]]; then
      echo "tpu_vm.sh: note: uncommitted changes are not shipped (setup copies git HEAD)" >&2
    fi
    do_cmd git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
    do_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:/tmp/lfi-jax-src.tar.gz" "${where[@]}" --worker=all
    on_workers all "set -e; rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf /tmp/lfi-jax-src.tar.gz -C $remote_dir && python3 -m venv $venv && $venv/bin/pip install -q -U pip && $venv/bin/pip install -q 'jax[tpu]==$jax_version' -e $remote_dir && $venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
    ;;
  mount)
    [[ $# -ge 1 ]] || die "mount needs a bucket name"
    bucket="${1#gs://}"; dir="${2:-/mnt/lfi-runs}"
    [[ "$bucket" =~ ^[a-z0-9][-a-z0-9_.]*$ ]] || die "bad bucket name '$1'"
    on_workers all "set -e; if ! command -v gcsfuse >/dev/null; then echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; sudo mkdir -p $dir && sudo chown \$(id -u):\$(id -g) $dir && (mountpoint -q $dir || gcsfuse --implicit-dirs --rename-dir-limit=200000 $bucket $dir)"
    ;;
  train)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || die "train needs the lfi_jax.train flags after --, e.g. train -- --config=configs/demo.py:ivit --workdir=~/lfi-runs/demo"
    train="$(quote_all "$@")"
    on_workers all "cd $remote_dir || exit 1; LFI_DISTRIBUTED=auto setsid nohup $venv/bin/python -m lfi_jax.train $train > $log 2>&1 < /dev/null & echo \$! > $pidfile; echo started on \$(hostname) pid \$(cat $pidfile)"
    ((dry_run)) || echo "tpu_vm.sh: training started on every worker; follow it with: $0 --name $name --zone $zone logs" >&2
    ;;
  logs)
    worker="${1:-0}"
    [[ "$worker" =~ ^[0-9]+$ ]] || die "logs takes a worker number, got '$worker'"
    on_workers "$worker" "tail -n 200 -f $log"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || die "run needs a command after --"
    on_workers all "$*"
    ;;
  stop)
    # SIGTERM: the trainer saves a checkpoint and exits.
    on_workers all "if [ -f $pidfile ]; then kill -TERM \$(cat $pidfile) 2>/dev/null && echo stopping \$(cat $pidfile) on \$(hostname); rm -f $pidfile; fi"
    ;;
  delete)
    do_cmd gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    ;;
  *) die "unknown command '$cmd' (create | setup | mount | train | logs | run | stop | delete)" ;;
esac
