#!/usr/bin/env bash
# Create .venv (if needed) and install the project. `bootstrap.sh test` adds the test extra
# (PyTorch CPU 2.13.0 + diffusers for parity tests); torch is installed first and pinned so pip
# never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
else
  .venv/bin/python -m pip install -q -e . 2>&1 | grep -v "is ignored" || true
fi
# (the test extra brings libtpu for AOT memory plans; keep its TPU probe quiet on machines without one)
[ "${1:-}" = "test" ] && export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
.venv/bin/python -c "import qwen_edit_jax, jax; print('qwen_edit_jax ready on', jax.devices()[0].platform)"
