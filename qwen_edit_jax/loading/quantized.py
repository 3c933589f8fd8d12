"""A `LazyParams` view that quantizes a float source's block kernels one layer at a time.

`QuantizedParams(lazy, "int4")` presents every block kernel `transformer_blocks.….kernel` as int8 / fp8 /
int4 values and adds its fp32 scales `….kernel_scale` `[L, groups, *out]`. Both the converter's
`--quantize` (which writes it as a merged checkpoint) and quantize-on-load (`loading.dit.place_params`,
which places it like any pre-quantized source) read through it. Each layer's float slice is read in its
stored dtype, quantized by one jitted `models.quant.quantize` on the default device and copied back, so
no float stacked leaf is ever whole on a device (the bf16 `img_mod` stack alone is 6.3 GiB). A read of
any slice reads the whole input axis of its layers (the scales need each group's maximum); the scales a
kernel read computes are kept until their own read, so writing a kernel and then its scale reads the
source once.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import jax
import numpy as np

from .. import config
from ..config import quant_scale_rows
from ..models.quant import qdtype, quantize
from ..weights.checkpoint import SCALE_SUFFIX, is_quantized_kernel
from ..weights.lazy import Index, LazyParams, into_out, norm_index
from .quant_leaf import read_dtype


@functools.lru_cache(maxsize=8)
def _quantize_fn(mode: str, axis: int, group: int):
    """Jitted `quantize`; keyed by the int4 group size it is traced with (`config.INT4_GROUP_SIZE`)."""
    return jax.jit(lambda w: quantize(w, mode, axis))


class QuantizedParams:
    """`LazyParams` of `lazy` with the block kernels quantized (`mode` "int8", "fp8" or "int4")."""

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
            return (s[0], quant_scale_rows(self.quantize, s[1]), *s[2:])
        return tuple(self.lazy.shape(path))

    def dtype(self, path: str) -> np.dtype:
        if path.endswith(SCALE_SUFFIX):
            return np.dtype(np.float32)
        return np.dtype(qdtype(self.quantize)) if is_quantized_kernel(path) else np.dtype(self.lazy.dtype(path))

    def _quantized(self, kernel: str, idx: tuple[slice, ...], want_values: bool):
        """(values or None, scales) of the layers / output columns `idx` selects, full input axis (axis 1)."""
        key = (kernel, tuple((s.start, s.stop, s.step) for s in (idx[0], *idx[2:])))
        if not want_values:
            with self._lock:
                scale = self._scales.pop(key, None)
            if scale is not None:
                return None, scale
        read_dt = read_dtype(self.lazy.dtype(kernel), np.float32)
        layers = range(*idx[0].indices(self.lazy.shape(kernel)[0]))
        cols = tuple(len(range(*i.indices(n))) for i, n in zip(idx[2:], self.lazy.shape(kernel)[2:]))
        n_in = self.lazy.shape(kernel)[1]
        q = np.empty((len(layers), n_in, *cols), qdtype(self.quantize)) if want_values else None
        scale = np.empty((len(layers), quant_scale_rows(self.quantize, n_in), *cols), np.float32)
        fn = _quantize_fn(self.quantize, 1, config.INT4_GROUP_SIZE)
        for j, layer in enumerate(layers):  # one float layer on the device at a time
            qj, scale[j:j + 1] = fn(self.lazy.read(kernel, (slice(layer, layer + 1), slice(None), *idx[2:]),
                                                   dtype=read_dt))
            if want_values:
                q[j:j + 1] = qj
        if want_values:
            with self._lock:
                self._scales[key] = scale
        return q, scale

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
