"""Quantize-on-load, one leaf at a time (the text encoder loader's; any loader placing whole leaves).

A float kernel is read (in its stored dtype), quantized on its devices by a jitted per-leaf
quantizer whose outputs land in their target shardings, and dropped before the next leaf: the float
model is never whole on the device (peak: the quantized model plus one float leaf and its values).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from ..models.quant import quantize


@functools.lru_cache(maxsize=64)
def leaf_quantizer(mode: str, axis: int, q_sharding: Sharding, s_sharding: Sharding):
    """One jitted per-leaf quantizer: the float leaf in, (values, scales) out already in their shardings."""
    return jax.jit(lambda w: quantize(w, mode, axis), out_shardings=(q_sharding, s_sharding))


def read_dtype(stored: Any, fallback: Any) -> Any:
    """Read a kernel to be quantized in its stored float dtype (bf16 stays bf16: no fp32 copy of the leaf)."""
    dt = np.dtype(stored)
    return dt if dt.kind == "f" or dt.name == "bfloat16" else fallback


__all__ = ["leaf_quantizer", "read_dtype"]
