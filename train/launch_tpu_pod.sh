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
#   SETUP=1   install the project on every worker first: `bash scripts/bootstrap.sh tpu`, the README's TPU
#             install (jax[tpu] with the libtpu it pins; never the tpu-plan extra, which is for CPU machines)
#   RESTART=N rerun the training command up to N times when it was preempted: a worker exited with 75
#             (train_lora.py saved a checkpoint after SIGTERM) or the ssh ended without any worker's exit
#             status (the VM went away). Before each rerun it waits (up to WAIT_READY seconds, default
#             3600) until `gcloud compute tpus tpu-vm describe` says READY, then repeats SYNC / SETUP (a
#             recreated VM has an empty disk). Default 0. Checkpoints must be on storage that outlives the VMs.
#   DRY_RUN=1 print the gcloud commands instead of running them
#
# Example (v5e-32 = 8 hosts × 4 chips; mesh sizes come from the config's `mesh:` section):
#   SYNC=1 SETUP=1 RESTART=10 train/launch_tpu_pod.sh my-v5e-32 us-west4-a train/configs/qwen-image-edit.yaml \
#       --output-dir /mnt/shared/runs/edit model.path=/mnt/shared/Qwen-Image-Edit/transformer data.path=/mnt/shared/cache
#
# Spot capacity (preemptible, much cheaper), through a queued resource that waits for the chips:
#   gcloud compute tpus queued-resources create my-v5e-32-qr --node-id=my-v5e-32 --zone=us-west4-a \
#       --accelerator-type=v5litepod-32 --runtime-version=v2-alpha-tpuv5-lite --spot
#   gcloud compute tpus queued-resources describe my-v5e-32-qr --zone=us-west4-a   # ACTIVE: the VMs exist
# or directly: gcloud compute tpus tpu-vm create my-v5e-32 --zone=us-west4-a --accelerator-type=v5litepod-32 \
#       --version=v2-alpha-tpuv5-lite --spot
# A preempted spot slice (state PREEMPTED) does not come back by itself: delete it (queued resource:
# `gcloud compute tpus queued-resources delete my-v5e-32-qr --zone=us-west4-a --force`) and create it again
# with the same node id; a RESTART loop still waiting picks it up, syncs, sets up and resumes the run.
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

# The remote command prints its exit status on a line of its own, so the status of every worker can be read
# from gcloud's output (gcloud's own exit status with --worker=all does not carry it).
MARK=qwen-edit-jax-exit-status
TRAIN="cd $REPO_DIR && QWEN_EDIT_JAX_DISTRIBUTED=1 .venv/bin/python train/train_lora.py --config $(printf '%q' "$CONFIG")$OVERRIDES"
PREEMPTED=75  # qwen_edit_jax.parallel.preemption.EXIT_PREEMPTED

prepare() {
  if [ "${SYNC:-0}" = 1 ]; then
    run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command "mkdir -p $REPO_DIR"
    run "${GCLOUD[@]}" scp "${COMMON[@]}" --worker=all --recurse "$ROOT/qwen_edit_jax" "$ROOT/train" "$ROOT/scripts" \
      "$ROOT/pyproject.toml" "$ROOT/README.md" "$TPU_NAME:$REPO_DIR/"
  fi
  if [ "${SETUP:-0}" = 1 ]; then
    run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command "cd $REPO_DIR && bash scripts/bootstrap.sh tpu"
  fi
}

wait_until_ready() {
  local waited=0 state
  while :; do
    state=$("${GCLOUD[@]}" describe "$TPU_NAME" "${COMMON[@]}" --format='value(state)' 2>/dev/null || echo UNKNOWN)
    [ "$state" = READY ] && return 0
    if [ "$waited" -ge "${WAIT_READY:-3600}" ]; then
      echo "error: $TPU_NAME is $state after ${waited} s; not restarting (recreate it, then run this command again)" >&2
      return 1
    fi
    echo "launch_tpu_pod: $TPU_NAME is $state; waiting for READY (a preempted spot slice must be recreated)" >&2
    sleep "${POLL_S:-30}"; waited=$((waited + ${POLL_S:-30}))
  done
}

if [ "${DRY_RUN:-0}" = 1 ]; then
  prepare
  # Every worker runs the same command; jax.distributed assigns process ids from the TPU metadata.
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command "$TRAIN; echo $MARK=\$?"
  exit 0
fi

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
for attempt in $(seq 0 "${RESTART:-0}"); do
  if [ "$attempt" -gt 0 ]; then
    echo "launch_tpu_pod: rerun $attempt of ${RESTART:-0}: the same command resumes from the newest checkpoint" >&2
    wait_until_ready || exit 1
  fi
  prepare
  ssh_status=0
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command "$TRAIN; echo $MARK=\$?" 2>&1 \
    | tee "$LOG" || ssh_status=$?
  statuses=$(sed -n "s/.*$MARK=\([0-9][0-9]*\).*/\1/p" "$LOG" | sort -un | tr '\n' ' ')
  if [ -n "$statuses" ] && [ "$statuses" = "0 " ] && [ "$ssh_status" = 0 ]; then
    exit 0
  fi
  if [[ " $statuses" == *" $PREEMPTED "* ]]; then
    echo "launch_tpu_pod: preempted (worker exit statuses: $statuses)" >&2
  elif [ -z "$statuses" ] && [ "$ssh_status" != 0 ]; then
    echo "launch_tpu_pod: gcloud ssh failed (exit status $ssh_status) with no worker's exit status: the VMs went away?" >&2
  else
    echo "error: training failed (worker exit statuses: ${statuses:-none}; gcloud: $ssh_status); not restarting" >&2
    for s in $statuses; do [ "$s" != 0 ] && exit "$s"; done
    exit "$ssh_status"
  fi
done
echo "error: still preempted after RESTART=${RESTART:-0} reruns" >&2
exit "$PREEMPTED"
