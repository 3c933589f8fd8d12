#!/usr/bin/env bash
# Every GPU check of the project in one call (the lent GPU machine has JAX+CUDA, torch, no diffusers):
#   carried wheels in .whl/ (diffusers 0.42.1, importlib_metadata; NOT flax 0.12.8, which breaks on the
#   machine's jax 0.11.2 — its own flax 0.12.10 works) are installed to /tmp/site. Fetch them with
#   `pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata`.
# Logs and JSON land in $OUT. Each check has its own time limit so one hang cannot eat the session.
set -uo pipefail
O=${OUT:-/tmp/gpu_suite}; mkdir -p "$O"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
# CHECKS="attention sample" runs a subset.
check() { local name=$1 limit=$2; shift 2; if [ -n "${CHECKS:-}" ] && [[ " $CHECKS " != *" $name "* ]]; then return; fi; echo "=== $name"; timeout "$limit" "$@" > "$O/$name.log" 2>&1; echo "rc=$?"; grep -v '^{' "$O/$name.log" | tail -n 25; tail -n 1 "$O/$name.log" | grep '^{' >> "$O/results.jsonl"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
WIDE="--heads 24 --head-dim 128 --txt-dim 3584"
check parity 150 python3 benchmarks/gpu_parity.py --layers 1 --img-tokens 1024 --ref-tokens 1024 --txt-tokens 128 --json
check qkv_cudnn 140 python3 benchmarks/train_step.py --layers 2 $WIDE --img-tokens 4096 --ref-tokens 4096 --txt-tokens 256 --dtype bf16 --compare-qkv --attention cudnn --iters 10 --json
check attention 80 python3 benchmarks/gpu_attention_check.py --json
check sample 80 python3 benchmarks/sample.py --jax-only --dtype bf16 --layers 4 $WIDE --img-tokens 4096 --ref-tokens 4096 --txt-tokens 256 --attention cudnn --steps 4 --iters 2 --json
check train 130 python3 train/check_gpu_training.py --out /tmp/gpu_train_check --steps 150
echo "=== done"
