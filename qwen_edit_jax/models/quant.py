"""Weight-only quantization of the frozen base: int8 or fp8 (e4m3) values with per-output-channel scales.

A kernel `w[in, *out]` (stacked: `[layers, in, *out]`) is stored as `q` (int8 or float8_e4m3fn, the
same shape) and `scale` (fp32, the kernel's shape with the input axis kept as size 1):

- int8: symmetric, `scale = max|w| · f32(1/127)` over the input axis, `q = clip(round(w · (1/scale)), -127, 127)`.
- fp8:  `scale = max|w| · f32(1/448)` (e4m3's largest finite value), `q = (w / scale)` rounded to e4m3.

A column of zeros gets scale 1 (q = 0). The matmul runs on the dequantized-to-activation-dtype values
with the scale applied to the fp32 result: `x @ (q·s) = (x @ q)·s` because `s` is constant along the
contracted axis, and every int8 / e4m3 value is exact in bf16, so the bf16 matmul sees exactly `q`.
XLA fuses the int8→bf16 convert into the dot's operand on TPU and GPU (no bf16 copy of the kernel).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

QuantMode = Literal["int8", "fp8"]
QUANT_MODES: tuple[str, ...] = ("int8", "fp8")
F32 = jnp.float32

_QDTYPE = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
_QMAX = {"int8": 127.0, "fp8": 448.0}


def qdtype(mode: str) -> jnp.dtype:
    """Storage dtype of quantized values for `mode`."""
    try:
        return _QDTYPE[mode]
    except KeyError:
        raise ValueError(f"quantize must be one of {list(QUANT_MODES)} or None, got {mode!r}") from None


def quantize(w: jax.Array, mode: str, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """(values, scale) of `w`, scales per slice along every axis but `axis` (the contracted input axis).

    `scale` keeps `axis` with size 1 (fp32). Computed in fp32 whatever `w`'s dtype.
    """
    dt, qmax = qdtype(mode), _QMAX[mode]
    wf = w.astype(F32)
    amax = jnp.max(jnp.abs(wf), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax * jnp.float32(1.0 / qmax), 1.0).astype(F32)  # a multiply: XLA would
    v = wf * (1.0 / scale)  # rewrite `/ const` as one anyway; one reciprocal per channel, then multiplies
    if mode == "int8":
        v = jnp.clip(jnp.round(v), -qmax, qmax)
    else:
        v = jnp.clip(v, -qmax, qmax)
    return v.astype(dt), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any = F32) -> jax.Array:
    """`q · scale` in `dtype` (computed in fp32)."""
    return (q.astype(F32) * scale).astype(dtype)


def scale_shape(kernel_shape: tuple[int, ...], axis: int = 0) -> tuple[int, ...]:
    """Shape of the scale for a kernel of `kernel_shape` quantized along `axis`."""
    s = list(kernel_shape)
    s[axis] = 1
    return tuple(s)


def reduced_axis(kernel_shape: tuple[int, ...], scale_shape_: tuple[int, ...]) -> int:
    """The quantized (input) axis: the one where the scale has size 1 and the kernel does not.

    Works for stacked (`[layers, in, *out]`) and plain kernels alike; the first such axis.
    """
    for i, (k, s) in enumerate(zip(kernel_shape, scale_shape_)):
        if s == 1 and k != 1:
            return i
    raise ValueError(f"scale shape {scale_shape_} does not reduce any axis of kernel shape {kernel_shape}")


__all__ = ["QUANT_MODES", "QuantMode", "dequantize", "qdtype", "quantize", "reduced_axis", "scale_shape"]
