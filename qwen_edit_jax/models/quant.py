"""Weight-only quantization of the frozen base: int8 / fp8 (e4m3) per output channel, int4 per group.

A kernel `w[in, *out]` (stacked: `[layers, in, *out]`) is stored as `q` (int8, float8_e4m3fn or int4, the
same shape) and `scale` (fp32, the kernel's shape with the input axis cut to its number of groups:
`config.quant_group_size` input rows share a scale — all of them for int8 / fp8, 64 for int4):

- int8: symmetric, `scale = max|w| · f32(1/127)` over the group, `q = clip(round(w · (1/scale)), -127, 127)`.
- int4: the same with 7 (`q ∈ [-7, 7]`, stored as `jnp.int4`: two values a byte on the device).
- fp8:  `scale = max|w| · f32(1/448)` (e4m3's largest finite value), `q = (w / scale)` rounded to e4m3.

A group of zeros gets scale 1 (q = 0). With one group (int8 / fp8) the matmul runs on the values cast to
the activation dtype and the scale multiplies the fp32 result: `x @ (q·s) = (x @ q)·s` because `s` is
constant along the contracted axis, and every int8 / e4m3 value is exact in bf16. With several groups
(int4) the kernel is dequantized to the activation dtype first (`dequantize`), one layer at a time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..config import QUANTIZE_MODES, quant_scale_rows

F32 = jnp.float32

_QDTYPE = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn), "int4": jnp.dtype(jnp.int4)}
_QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}


def qdtype(mode: str) -> jnp.dtype:
    """Storage dtype of quantized values for `mode`."""
    try:
        return _QDTYPE[mode]
    except KeyError:
        raise ValueError(f"quantize must be one of {list(QUANTIZE_MODES)} or None, got {mode!r}") from None


def _grouped(x: jax.Array, axis: int, groups: int) -> jax.Array:
    """`x` with `axis` split into (groups, rows per group)."""
    return x.reshape(*x.shape[:axis], groups, x.shape[axis] // groups, *x.shape[axis + 1:])


def quantize(w: jax.Array, mode: str, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """(values, scale) of `w`, one scale per output element and group of `axis` (the contracted input axis).

    `scale` has `w`'s shape with `axis` cut to the number of groups (1 for int8 / fp8). Computed in fp32
    whatever `w`'s dtype.
    """
    dt, qmax = qdtype(mode), _QMAX[mode]
    groups = quant_scale_rows(mode, w.shape[axis])
    wf = _grouped(w.astype(F32), axis, groups)
    amax = jnp.max(jnp.abs(wf), axis=axis + 1, keepdims=True)
    scale = jnp.where(amax > 0, amax * jnp.float32(1.0 / qmax), 1.0).astype(F32)  # a multiply: XLA would
    v = wf * (1.0 / scale)  # rewrite `/ const` as one anyway; one reciprocal per group, then multiplies
    v = jnp.clip(v if mode == "fp8" else jnp.round(v), -qmax, qmax)
    return v.astype(dt).reshape(w.shape), jnp.squeeze(scale, axis + 1)


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any = F32, axis: int | None = None) -> jax.Array:
    """`q · scale` in `dtype` (computed in fp32), each scale row applied to its group of `axis` (default:
    the axis where the scale is shorter, `reduced_axis`)."""
    axis = reduced_axis(q.shape, scale.shape) if axis is None else axis
    groups = scale.shape[axis]
    w = _grouped(q.astype(F32), axis, groups) * jnp.expand_dims(scale, axis + 1)
    return w.reshape(q.shape).astype(dtype)


def reduced_axis(kernel_shape: tuple[int, ...], scale_shape_: tuple[int, ...]) -> int:
    """The quantized (input) axis: the first one where the scale is shorter than the kernel.

    Works for stacked (`[layers, in, *out]`) and plain kernels alike.
    """
    for i, (k, s) in enumerate(zip(kernel_shape, scale_shape_)):
        if s < k:
            return i
    raise ValueError(f"scale shape {scale_shape_} does not reduce any axis of kernel shape {kernel_shape}")


__all__ = ["dequantize", "qdtype", "quantize", "reduced_axis"]
