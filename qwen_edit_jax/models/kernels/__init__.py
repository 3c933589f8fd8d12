"""Attention kernels shared by the models, chosen by name.

Every kernel has the signature `fn(q, k, v, key_mask) -> out` with q, k, v `[B, S, H, d]`, scale
1/√d, and `key_mask` `[B, S]` bool (True = attend) or None. Built in: `xla` (reference, materialises
the scores), `chunked` (query chunks), `flash` (blocked online softmax with a recomputing backward,
plain JAX, any backend), `cudnn` (NVIDIA), `splash` (TPU Pallas, imported on first use), and `auto`,
which picks per platform when traced: `splash` on TPU, `cudnn` on GPUs for bf16/fp16 inputs (head_dim
≤ 128), else `flash` (on CPU 2–4× faster than `xla` forward and backward; benchmarks/attention.py).
The names are `config.ATTENTION_KERNELS`, the set `ModelOptions(attention=...)` accepts.
"""

from __future__ import annotations

from typing import Callable

import jax

import jax.numpy as jnp

from ...parallel.mesh import current_mesh
from .cudnn import cudnn_attention, valid_keys_first
from .flash import flash_attention
from .platform import platform_of
from .xla import chunked_attention, xla_attention

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, "jax.Array | None"], jax.Array]
_KERNELS: dict[str, AttentionFn] = {"xla": xla_attention, "chunked": chunked_attention, "cudnn": cudnn_attention,
                                    "flash": flash_attention}


def cudnn_flash_capable(device: object) -> bool:
    """cuDNN's flash attention needs an Ampere or newer NVIDIA GPU (compute capability ≥ 8.0): a T4 or V100
    takes flash instead. A device that reports no capability is taken as capable."""
    cc = getattr(device, "compute_capability", None)
    try:
        return cc is None or float(cc) >= 8.0
    except (TypeError, ValueError):
        return True


def auto_kernel_name(dtype: object, head_dim: int, mesh: object = None) -> str:
    """The kernel `auto` runs: splash on TPU, cuDNN on Ampere-or-newer GPUs for half-precision inputs with
    head_dim ≤ 128 (the DiT's 128, the vision tower's 80; not the VAE's single 384-wide head), else flash."""
    platform = platform_of(mesh)
    if platform == "tpu":
        return "splash"
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    # a mesh names the platform only (abstract devices carry no compute capability): GPU programs are
    # compiled on the machine that runs them, whose first device is one of its GPUs
    if platform in ("gpu", "cuda", "rocm") and half and head_dim <= 128 and cudnn_flash_capable(jax.devices()[0]):
        return "cudnn"
    return "flash"


def auto_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    """`auto`: resolved at trace time from the platform (the mesh's, when AOT-compiling for a TPU)."""
    return get_attention(auto_kernel_name(q.dtype, q.shape[-1], current_mesh()))(q, k, v, key_mask)


def get_attention(name: str) -> AttentionFn:
    """The kernel called `name`; 'splash' (TPU Pallas) is imported on first use."""
    if name == "auto":
        return auto_attention
    if name == "splash" and name not in _KERNELS:
        from .splash import splash_attention  # optional heavy backend: Pallas TPU kernels

        _KERNELS[name] = splash_attention
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown attention implementation {name!r}; available: {sorted(_KERNELS | {'splash': 0})}") from None


__all__ = ["AttentionFn", "auto_attention", "auto_kernel_name", "chunked_attention", "cudnn_attention",
           "cudnn_flash_capable", "flash_attention", "get_attention", "valid_keys_first",
           "xla_attention"]
