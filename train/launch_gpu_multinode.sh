#!/usr/bin/env bash
# Launch LoRA training on several GPU nodes: one process per node driving all its GPUs. The
# processes meet through jax.distributed (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID, read by qwen_edit_jax.parallel.distributed.initialize), build one mesh over every GPU,
# each reads only its own weight shards and batch rows, and Orbax checkpoints are written by all
# nodes together (checkpoint/output dirs must be on storage every node sees).
#
# Usage, one of:
#   HOSTS=node0,node1,node2 train/launch_gpu_multinode.sh CONFIG.yaml --output-dir DIR [key=value ...]
#       ssh into every host (passwordless ssh; same REPO_DIR everywhere), start process i on host i,
#       coordinator on the first host at PORT; waits for all and fails if any fails.
#   srun --nodes=N --ntasks-per-node=1 train/launch_gpu_multinode.sh CONFIG.yaml [...]
#       under SLURM nothing else is needed: JAX reads the SLURM environment.
#   NODE_RANK=i NNODES=N COORDINATOR=node0:PORT train/launch_gpu_multinode.sh CONFIG.yaml [...]
#       run by hand (or by another launcher) on each node.
#
# Environment: REPO_DIR (default: this checkout), PORT (default 12355), DRY_RUN=1 prints commands.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  exit 2
fi
CONFIG=$1; shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Fail here, not on every node: the config is read relative to REPO_DIR (default: this checkout).
if [ ! -f "$CONFIG" ] && [ ! -f "$ROOT/$CONFIG" ]; then
  echo "error: config $CONFIG not found (relative paths are relative to the repository root; shipped: $(cd "$ROOT" && ls train/configs/*.yaml | tr '\n' ' '))" >&2
  exit 2
fi
REPO_DIR=${REPO_DIR:-$ROOT}
PORT=${PORT:-12355}
# XLA GPU settings commonly used for sharded training: overlap collectives with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

ARGS=""
for a in "$CONFIG" "$@"; do ARGS+=" $(printf '%q' "$a")"; done
TRAIN="cd $(printf '%q' "$REPO_DIR") && .venv/bin/python train/train_lora.py --config$ARGS"

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ -n "${HOSTS:-}" ]; then
  IFS=, read -r -a H <<< "$HOSTS"
  N=${#H[@]}
  COORD="${H[0]}:$PORT"
  pids=()
  for i in "${!H[@]}"; do
    ENV="JAX_COORDINATOR_ADDRESS=$COORD JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i XLA_FLAGS='$XLA_FLAGS'"
    ENV+=" XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
    if [ "${DRY_RUN:-0}" = 1 ]; then
      run ssh "${H[$i]}" "$ENV bash -c $(printf '%q' "$TRAIN")"
    else
      ssh "${H[$i]}" "$ENV bash -c $(printf '%q' "$TRAIN")" 2>&1 | sed "s/^/[${H[$i]}] /" &
      pids+=($!)
    fi
  done
  status=0
  for p in "${pids[@]:-}"; do [ -z "$p" ] || wait "$p" || status=1; done
  exit $status
fi

if [ -n "${NODE_RANK:-}" ]; then
  : "${NNODES:?NNODES must be set with NODE_RANK}"; : "${COORDINATOR:?COORDINATOR (host:port of rank 0) must be set}"
  export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NNODES JAX_PROCESS_ID=$NODE_RANK
fi
# Under SLURM (or with the variables above) qwen_edit_jax.parallel.distributed.initialize() starts jax.distributed.
run bash -c "$TRAIN"
