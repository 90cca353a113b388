#!/usr/bin/env bash
# Starts an eva_jax run on every worker of a Cloud TPU VM slice (one host or a pod slice).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b experiments/launch_tpu.sh \
#       --config=configs/default.py --workdir=/mnt/eva/default [--create] [--skip-setup] \
#       [--detach] [--dry-run] [-- --config.seed=1 --config.train.loss=sppo ...]
#
# Steps, each a gcloud command run from this machine:
#   1. (--create) create the TPU VM: ACCELERATOR_TYPE, RUNTIME_VERSION, SPOT=1 for a spot VM.
#   2. (unless --skip-setup) copy this working tree (a tarball, without .git and workdirs) to
#      REMOTE_DIR on every worker and pip install it there with jax[tpu].
#   3. start `python3 -m eva_jax.main --config=... --workdir=... [overrides]` on all workers at
#      once: each worker is one JAX process, and the runner joins them with
#      jax.distributed.initialize(). Without --detach the command streams the output and returns
#      when the run ends (how experiments/sweep.py --print_tpu_commands chains runs); with
#      --detach the run continues in the background and logs to ~/eva_jax_run.log on each worker.
#
# On a pod slice the workdir must be a folder that every worker sees (an NFS / Filestore mount,
# or a bucket mounted with gcsfuse): process 0 writes the artifacts, every process reads them,
# and Orbax writes each host's checkpoint shards there. A preempted run resumes when started
# again with the same --workdir.
#
# Settings (flags win over the environment): TPU_NAME / --tpu, ZONE / --zone,
# PROJECT_ID / --project (default: gcloud's), CONFIG / --config, WORKDIR / --workdir,
# REMOTE_DIR (default ~/eva_jax; no spaces), ACCELERATOR_TYPE (default v4-32),
# RUNTIME_VERSION (default tpu-ubuntu2204-base), SPOT (1 = spot VM).
# --dry-run prints every command instead of running it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT_ID="${PROJECT_ID:-}"
CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:-}"
REMOTE_DIR="${REMOTE_DIR:-~/eva_jax}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
CREATE=0
SETUP=1
DETACH=0
DRY_RUN=0
EXTRA=()

usage() {
  sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

while (($#)); do
  case "$1" in
    --tpu=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT_ID="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --create) CREATE=1 ;;
    --skip-setup) SETUP=0 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "launch_tpu.sh: unknown argument '$1'" >&2; usage ;;
  esac
  shift
done

for name in TPU_NAME ZONE WORKDIR; do
  if [[ -z "${!name}" ]]; then
    echo "launch_tpu.sh: set $name (or its flag); see the header of this script" >&2
    exit 2
  fi
done
if [[ ! -f "$REPO/${CONFIG%%:*}" ]]; then
  echo "launch_tpu.sh: config '${CONFIG%%:*}' is not a file under $REPO" >&2
  exit 2
fi

# Runs a command, or prints it (quoted so that it can be pasted) under --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "$PROJECT_ID" ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT_ID")
fi

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all \
    --command="$1"
}

if ((CREATE)); then
  CREATE_FLAGS=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then
    CREATE_FLAGS+=(--spot)
  fi
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "${CREATE_FLAGS[@]}"
fi

if ((SETUP)); then
  TARBALL="${TMPDIR:-/tmp}/eva_jax_src.tgz"
  # The working tree as it is (uncommitted edits included), without history or run outputs.
  run tar -czf "$TARBALL" --exclude=.git --exclude=./workdirs --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache -C "$REPO" .
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:eva_jax_src.tgz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  # Extracted over any previous copy (never deleted: a workdir may live inside it).
  on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -xzf ~/eva_jax_src.tgz -C $REMOTE_DIR \
&& cd $REMOTE_DIR && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ."
fi

MAIN="EVA_DISTRIBUTED=1 python3 -m eva_jax.main $(printf '%q ' "--config=$CONFIG" "--workdir=$WORKDIR" \
  ${EXTRA[@]+"${EXTRA[@]}"} | sed 's/ $//')"
if ((DETACH)); then
  on_all_workers "cd $REMOTE_DIR && setsid nohup $MAIN > ~/eva_jax_run.log 2>&1 < /dev/null &"
else
  on_all_workers "cd $REMOTE_DIR && $MAIN"
fi
