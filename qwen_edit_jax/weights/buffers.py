"""Host memory for streaming weights: reused scratch buffers, and page-cache drop-behind for outputs.

Streaming a checkpoint touches every byte once, so the cost that remains is memory that is new
to the process: each fresh `np.empty` of a large tensor is a new mapping the kernel zero-fills page
by page, and each written file fills new page-cache pages. On virtual machines that hand freed
memory back to the host (virtio-balloon free page reporting), a first touch costs several times a
copy into memory already in use (measured in docs/convert.md).

* `ScratchBuffers` hands out buffers that are returned and reused, so a conversion touches new
  memory only for its first few tensors.
* `drop_cached(path)` writes a finished file's dirty pages back and drops them from the page cache
  (`dd oflag=nocache`, `rsync --drop-cache`), so the next file's pages are the ones just released,
  and a 40 GB output does not push everything else out of the cache.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

POOL_MIN_BYTES = 1 << 20  # smaller arrays come from the allocator's own (reused) heap


def _owner(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class ScratchBuffers:
    """Reusable host buffers (thread-safe): `take` a shaped array, `give` it back when done with it.

    A request takes the smallest free buffer that holds it, else allocates one; buffers are kept
    until the pool is dropped, so the pool's size is the peak of what was held at once.
    """

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A C-contiguous array of that shape and dtype (contents undefined)."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if n < POOL_MIN_BYTES:
            return np.empty(shape, dtype)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= n]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes)) if fits else None
        if buf is None:
            buf = np.empty(n, np.uint8)
        return buf[:n].view(dtype).reshape(shape)

    def give(self, array: np.ndarray) -> None:
        """Return an array from `take` (its contents may be overwritten from now on)."""
        if array.nbytes < POOL_MIN_BYTES:
            return
        buf = _owner(array)
        with self._lock:
            if not any(b is buf for b in self._free):
                self._free.append(buf)


def drop_cached(file: str | int, *, sync: bool = True, offset: int = 0, length: int = 0) -> None:
    """Drop a file's pages (a path, or an open descriptor) from the page cache; `sync` writes them back first.

    `offset`/`length`: only that byte range (length 0: to the end of the file).

    Without `sync`, dirty pages are only queued for write-back and stay until a later call.
    Only a hint: where `posix_fadvise` is missing (macOS, Windows) nothing is dropped.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    if isinstance(file, int):
        fd, own = file, False
    else:
        try:
            fd, own = os.open(file, os.O_RDONLY), True
        except OSError:  # removed or renamed meanwhile (a writer's temporary file)
            return
    try:
        if sync:
            os.fdatasync(fd)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        if own:
            os.close(fd)


class DropBehind:
    """Drop the page-cache pages of a folder's finished files as a writer goes (e.g. Orbax's OCDBT files).

    `sweep()` drops every file whose size has not changed since the previous sweep (one still being
    appended to is left for a later sweep; a sweep already running elsewhere makes it return at once);
    `wrote(n)` sweeps every `every` bytes, so a long conversion does not list its folder per chunk;
    `close()` syncs and drops whatever is left. `sync`: write each file back before dropping it (for a
    writer that does not sync its files itself; `save_merged` turns tensorstore's per-chunk fsync off).
    """

    def __init__(self, folder: str, *, sync: bool = False, every: int = 64 << 20):
        self.folder, self.sync, self.every = folder, sync, every
        self._pending = 0
        self._seen: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def _files(self) -> dict[str, int]:
        out = {}
        for d, _, files in os.walk(self.folder):
            for f in files:
                p = os.path.join(d, f)
                try:
                    out[p] = os.path.getsize(p)
                except OSError:
                    pass
        return out

    def wrote(self, nbytes: int) -> None:
        """Count bytes the writer finished; sweeps once `every` bytes have accumulated."""
        self._pending += nbytes
        if self._pending >= self.every:
            self._pending = 0
            self.sweep()

    def sweep(self, *, final: bool = False) -> None:
        """Drop what is finished; returns at once while another thread is sweeping (unless `final`)."""
        if not self._lock.acquire(blocking=final):
            return
        try:
            now = self._files()
            for p, size in now.items():
                if self._dropped.get(p) == size or not (final or self._seen.get(p) == size):
                    continue
                drop_cached(p, sync=self.sync or final)
                self._dropped[p] = size
            self._seen = now
        finally:
            self._lock.release()

    def close(self) -> None:
        self.sweep(final=True)
