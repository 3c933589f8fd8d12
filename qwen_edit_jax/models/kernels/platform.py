"""Which platform a kernel is traced for: the current mesh's devices (a TPU topology when AOT-compiling
for one on a CPU host), else JAX's default backend."""

from __future__ import annotations

from typing import Any

import jax


def platform_of(mesh: Any = None) -> str:
    """'cpu', 'gpu'/'cuda'/'rocm' or 'tpu'."""
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    if device is not None and getattr(device, "platform", None):
        return device.platform
    return jax.default_backend()
