"""Array layout helpers for weight I/O."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

TILE = 128  # a 128×128 tile of any dtype ≤ 4 bytes fits in L1/L2 with its transpose
_MIN_PARALLEL = 1 << 20  # elements; smaller matrices are transposed on the calling thread
_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="transpose")


def _tiles(a: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    for i in range(r0, r1, TILE):
        i1 = min(i + TILE, r1)
        for j in range(0, a.shape[1], TILE):
            out[j:j + TILE, i:i1] = a[i:i1, j:j + TILE].T


def transpose_2d(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`a.T` copied tile by tile into `out` (any strides, cast to its dtype) or a new C-contiguous array.

    numpy's whole-array strided copy of a transposed view misses the cache on every element;
    cache-sized tiles do not, and row bands go to a thread per core (numpy releases the GIL while copying).
    torch Linear weights `[out, in]` become Flax kernels `[in, out]` through this.
    """
    m, n = a.shape
    if out is None:
        out = np.empty((n, m), a.dtype)
    if a.size < _MIN_PARALLEL or _POOL._max_workers == 1:
        _tiles(a, out, 0, m)
        return out
    band = -(-m // (2 * _POOL._max_workers * TILE)) * TILE
    list(_POOL.map(lambda r0: _tiles(a, out, r0, min(r0 + band, m)), range(0, m, band)))
    return out
