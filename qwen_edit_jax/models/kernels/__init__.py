"""Attention kernels shared by the models, chosen by name.

Every kernel has the signature `fn(q, k, v, key_mask) -> out` with q, k, v `[B, S, H, d]`, scale
1/√d, and `key_mask` `[B, S]` bool (True = attend) or None. Built in: `xla` (reference, materialises
the scores), `chunked` (query chunks), `cudnn` (NVIDIA flash), `splash` (TPU Pallas, imported on first
use). `register_attention` adds more.
"""

from __future__ import annotations

from typing import Callable

import jax

from .cudnn import cudnn_attention, valid_keys_first
from .xla import chunked_attention, xla_attention

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, "jax.Array | None"], jax.Array]
_KERNELS: dict[str, AttentionFn] = {"xla": xla_attention, "chunked": chunked_attention, "cudnn": cudnn_attention}


def register_attention(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator: make `fn` available as `ModelOptions(attention=name)`."""
    def deco(fn: AttentionFn) -> AttentionFn:
        _KERNELS[name] = fn
        return fn

    return deco


def get_attention(name: str) -> AttentionFn:
    """The kernel called `name`; 'splash' (TPU Pallas) is imported on first use."""
    if name == "splash" and name not in _KERNELS:
        from .splash import splash_attention  # optional heavy backend: Pallas TPU kernels

        _KERNELS[name] = splash_attention
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown attention implementation {name!r}; available: {sorted(_KERNELS | {'splash': 0})}") from None


__all__ = ["AttentionFn", "chunked_attention", "cudnn_attention", "get_attention", "register_attention",
           "valid_keys_first", "xla_attention"]
