"""A `LazyParams` view that quantizes a float source's block kernels slice by slice (the converter's `--quantize`).

`QuantizedParams(lazy, "int8")` presents every block kernel `transformer_blocks.….kernel` as int8 /
fp8 values and adds its fp32 scales `….kernel_scale` `[L, 1, *out]`, computed by the same jitted
`models.quant.quantize` that quantize-on-load uses, one layer at a time (a read of any slice reads the
whole input axis of those layers: the scale needs the column's maximum). Scales are kept once computed
(a few KiB per layer), so writing a kernel and then its scale reads the source once.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import jax
import numpy as np

from ..models.quant import qdtype, quantize
from ..weights.checkpoint import SCALE_SUFFIX, is_quantized_kernel
from ..weights.lazy import Index, LazyParams, into_out, norm_index


@functools.lru_cache(maxsize=8)
def _quantize_fn(mode: str, axis: int):
    return jax.jit(lambda w: quantize(w, mode, axis))


class QuantizedParams:
    """`LazyParams` of `lazy` with the block kernels quantized (`mode` "int8" or "fp8")."""

    def __init__(self, lazy: LazyParams, mode: str):
        qdtype(mode)  # validates
        if any(p.endswith(SCALE_SUFFIX) for p in lazy.paths()):
            raise ValueError(f"{lazy.description}: already quantized")
        self.lazy, self.quantize = lazy, mode
        self.config, self.fuse_qkv = lazy.config, lazy.fuse_qkv
        self.description = f"{lazy.description} (quantized {mode})"
        self._kernels = [p for p in lazy.paths() if is_quantized_kernel(p)]
        self._scales: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def paths(self) -> list[str]:
        return list(self.lazy.paths()) + [k + SCALE_SUFFIX for k in self._kernels]

    def shape(self, path: str) -> tuple[int, ...]:
        if path.endswith(SCALE_SUFFIX):
            s = tuple(self.lazy.shape(path[: -len(SCALE_SUFFIX)]))
            return (s[0], 1, *s[2:])
        return tuple(self.lazy.shape(path))

    def dtype(self, path: str) -> np.dtype:
        if path.endswith(SCALE_SUFFIX):
            return np.dtype(np.float32)
        return np.dtype(qdtype(self.quantize)) if is_quantized_kernel(path) else np.dtype(self.lazy.dtype(path))

    def _quantized(self, kernel: str, idx: tuple[slice, ...], want_values: bool):
        """(values or None, scales) of the layers/output columns `idx` selects, full input axis (axis 1)."""
        full = (idx[0], slice(None), *idx[2:])
        key = (kernel, tuple((s.start, s.stop, s.step) for s in full))
        with self._lock:
            scale = self._scales.get(key)
        if scale is not None and not want_values:
            return None, scale
        src_dt = np.dtype(self.lazy.dtype(kernel))
        w = self.lazy.read(kernel, full, dtype=src_dt if src_dt.kind == "f" or src_dt.name == "bfloat16" else np.float32)
        q, s = _quantize_fn(self.quantize, 1)(w)
        s = np.asarray(s)
        with self._lock:
            self._scales[key] = s
        return np.asarray(q), s

    def read(self, path: str, index: Index | None = None, dtype: Any = None, out: np.ndarray | None = None
             ) -> np.ndarray:
        if path.endswith(SCALE_SUFFIX):
            idx = norm_index(index, self.shape(path))
            kernel = path[: -len(SCALE_SUFFIX)]
            kidx = (idx[0], slice(None), *idx[2:])
            _, s = self._quantized(kernel, norm_index(kidx, self.lazy.shape(kernel)), False)
            value = s[:, idx[1]]
        elif is_quantized_kernel(path):
            idx = norm_index(index, self.shape(path))
            q, _ = self._quantized(path, idx, True)
            value = q[:, idx[1]]
        else:
            return self.lazy.read(path, index, dtype=dtype, out=out)
        return into_out(value if dtype is None else value.astype(np.dtype(dtype)), out, path)


__all__ = ["QuantizedParams"]
