#!/usr/bin/env bash
# Create .venv (if needed) and install the project (CPU jax). `bootstrap.sh gpu` / `bootstrap.sh tpu` install
# the jax build for NVIDIA GPUs / TPU VMs instead. `bootstrap.sh test` adds the test extra
# (PyTorch CPU 2.13.0 + diffusers for parity tests, libtpu for TPU memory plans); torch is installed
# first and pinned so pip never pulls a multi-GB CUDA build. `NO_VENV=1` installs into $PYTHON itself instead of
# .venv (a notebook's kernel: notebooks/qwen_image_edit_lora.ipynb). The TPU install is the same everywhere
# (README, train/launch_tpu_pod.sh SETUP=1, the notebook): `jax[tpu]` with the libtpu it pins; the test extra's
# libtpu (for AOT memory plans on CPU machines) is never installed on a TPU VM.
# pip runs quietly; known noise is dropped from its output, and any pip failure stops this script
# with pip's exit status and its full output (nothing is left to turn into a silent test skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${NO_VENV:-0}" = 1 ]; then
  VPY=$PY
else
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  VPY=.venv/bin/python
fi

# pip's output without known noise: "… is ignored" notices and setuptools' "InformationOnly" box
# or "BuildBackendWarning: Editable installation" box ("… folders with the same name …"), which -q does
# not silence.
drop_noise() {
  awk '
    /^[[:space:]]*!![[:space:]]*$/ {
      if (!box) { box = 1; quiet = (held && line ~ /InformationOnly|BuildBackendWarning: Editable installation/); if (quiet) held = 0 }
      else { box = 0; after = quiet }
      if (!quiet) { if (held) print line; held = 0; print }
      next
    }
    box && quiet { next }
    after { after = 0; next }
    /is ignored/ { next }
    { if (held) print line; line = $0; held = 1 }
    END { if (held) print line }'
}

pip_quiet() {
  local out status=0
  out=$("$VPY" -m pip "$@" 2>&1) || status=$?
  if [ "$status" -ne 0 ]; then
    printf '%s\n' "$out" >&2
    echo "error: 'pip $*' failed (exit status $status); nothing after it was installed" >&2
    exit "$status"
  fi
  if [ -n "$out" ]; then
    printf '%s\n' "$out" | drop_noise
  fi
}

pip_quiet install -q --upgrade pip
case "${1:-}" in
  test)
    pip_quiet install -q "torch==2.13.0"
    pip_quiet install -q -e ".[test]" ;;
  gpu|tpu) pip_quiet install -q -e ".[$1]" ;;  # the jax build for NVIDIA GPUs / TPU VMs
  "") pip_quiet install -q -e . ;;
  *) echo "usage: bash scripts/bootstrap.sh [test|gpu|tpu]" >&2; exit 2 ;;
esac
# JAX_PLATFORMS=cpu unless the machine has a TPU or GPU (qwen_edit_jax.utils.accelerators): libtpu from
# the test extra would otherwise probe for a TPU and print a screen of errors on a CPU-only machine.
"$VPY" -c "
from qwen_edit_jax.utils.accelerators import cpu_unless_accelerator
cpu_unless_accelerator()
import jax, qwen_edit_jax
print('qwen_edit_jax ready on', jax.devices()[0].platform)"
