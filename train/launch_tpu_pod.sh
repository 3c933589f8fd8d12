#!/usr/bin/env bash
# Launch LoRA training on every host of a Cloud TPU pod slice: one process per TPU VM worker,
# all started at once by `gcloud compute tpus tpu-vm ssh --worker=all`. The processes find each
# other through jax.distributed (QWEN_EDIT_JAX_DISTRIBUTED=1 → JAX's TPU auto-detection), build
# one mesh over all chips, each reads only its own weight shards and batch rows, and Orbax
# checkpoints are written by all hosts together. --output-dir and data.path are gs:// URLs (or paths on
# storage every worker sees, such as an NFS / Filestore mount); each host reads only its rows of the cache.
#
# Usage:
#   train/launch_tpu_pod.sh TPU_NAME ZONE CONFIG.yaml --output-dir DIR [key=value ...]
#   (everything after CONFIG.yaml is passed to train/train_lora.py on every worker)
#
# Environment:
#   PROJECT   gcloud project (default: gcloud's configured project)
#   REPO_DIR  path of this repository on the workers (default: ~/qwen-edit-jax)
#   SYNC=1    copy this checkout to every worker first (gcloud … scp --worker=all)
#   SETUP=1   install the project on every worker first (scripts/bootstrap.sh + the tpu extra: libtpu)
#   DRY_RUN=1 print the gcloud commands instead of running them
#
# Example (v5e-32 = 8 hosts × 4 chips; mesh sizes come from the config's `mesh:` section):
#   SYNC=1 SETUP=1 train/launch_tpu_pod.sh my-v5e-32 us-west4-a train/configs/qwen-image-edit.yaml \
#       --output-dir /mnt/shared/runs/edit model.path=/mnt/shared/Qwen-Image-Edit/transformer data.path=/mnt/shared/cache
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; shift 3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Fail here, not on every worker: the config is read on the workers relative to REPO_DIR, which is
# (or, with SYNC=1, becomes) a copy of this checkout.
if [ ! -f "$CONFIG" ] && [ ! -f "$ROOT/$CONFIG" ]; then
  echo "error: config $CONFIG not found (relative paths are relative to the repository root; shipped: $(cd "$ROOT" && ls train/configs/*.yaml | tr '\n' ' '))" >&2
  exit 2
fi
REPO_DIR=${REPO_DIR:-'~/qwen-edit-jax'}
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
[ -n "${PROJECT:-}" ] && COMMON+=(--project "$PROJECT")

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# Quote the overrides once so they survive the remote shell.
OVERRIDES=""
for a in "$@"; do OVERRIDES+=" $(printf '%q' "$a")"; done

if [ "${SYNC:-0}" = 1 ]; then
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command "mkdir -p $REPO_DIR"
  run "${GCLOUD[@]}" scp "${COMMON[@]}" --worker=all --recurse "$ROOT/qwen_edit_jax" "$ROOT/train" "$ROOT/scripts" \
    "$ROOT/pyproject.toml" "$ROOT/README.md" "$TPU_NAME:$REPO_DIR/"
fi
if [ "${SETUP:-0}" = 1 ]; then
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all \
    --command "cd $REPO_DIR && bash scripts/bootstrap.sh && .venv/bin/python -m pip install -q -e '.[tpu-plan]'"
fi

# Every worker runs the same command; jax.distributed assigns process ids from the TPU metadata.
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command \
  "cd $REPO_DIR && QWEN_EDIT_JAX_DISTRIBUTED=1 .venv/bin/python train/train_lora.py --config $(printf '%q' "$CONFIG")$OVERRIDES"
