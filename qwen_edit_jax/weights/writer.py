"""Writing safetensors checkpoints tensor by tensor, atomically.

`SafetensorsWriter` lays out a file's header from a plan (name, shape, dtype) before any data
exists, then streams each tensor to its offset, so a shard never has to be held in memory.
`write_sharded` splits planned tensors into diffusers-style shards + index, writing on a thread of
its own (`write_behind`). Tensors that arrive in plan order can go to disk with O_DIRECT
(`DirectFile`), past the page cache; `buffers` says why that matters.

Every output goes to a temporary name beside the target and is renamed only when complete;
an existing target is replaced only with `overwrite=True` (and never deleted before the new
output is in place).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (numpy bfloat16 / float8)
import numpy as np

from ..utils.files import atomic_path
from .buffers import drop_cached
from .safetensors_io import INDEX_NAME, SINGLE_NAME, st_dtype

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # diffusers' default "5GB" (decimal, as `parse_size` reads it)

def parse_size(size: int | str) -> int:
    """'5GB', '300KB', '10MiB' or an int → bytes (decimal units as in diffusers/transformers)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(s)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


# ---- one safetensors file ---------------------------------------------------------------------
class DirectFile:
    """A file written front to back with O_DIRECT (no page cache) through one reused page-aligned buffer.

    Raises OSError on open where the file system refuses O_DIRECT (the caller falls back to buffered
    writes). `close()` pads the last block, truncates to `size` and syncs.
    """

    ALIGN = 4096  # O_DIRECT wants offsets, lengths and memory aligned to the device's block size

    def __init__(self, path: str, size: int, staging: int = 16 << 20):
        self.size = size
        if not hasattr(os, "O_DIRECT"):  # macOS, Windows
            raise OSError(f"{path}: O_DIRECT is not available on this platform")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
        self._stage = mmap.mmap(-1, staging)  # anonymous mappings are page aligned
        self._view = np.frombuffer(self._stage, np.uint8)
        self._fill = 0

    def write(self, data: np.ndarray) -> None:
        """Append `data` (1-D uint8)."""
        i, n, cap = 0, data.size, self._view.size
        while i < n:
            k = min(n - i, cap - self._fill)
            self._view[self._fill:self._fill + k] = data[i:i + k]
            self._fill += k
            i += k
            if self._fill == cap:
                self._flush(cap)

    def _flush(self, n: int) -> None:
        done = 0
        while done < n:
            done += os.write(self.fd, memoryview(self._stage)[done:n])
        self._fill = 0

    def close(self) -> None:
        try:
            if self._fill:
                pad = -self._fill % self.ALIGN
                self._view[self._fill:self._fill + pad] = 0
                self._flush(self._fill + pad)
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            del self._view
            self._stage.close()


class SafetensorsWriter:
    """Write one safetensors file whose tensors are known (name, shape, dtype) in advance.

    The header is written first; `write(name, array)` puts each tensor at its offset in any order.
    `close()` checks every planned tensor was written. Written pages leave the page cache as the
    file grows (`buffers.drop_cached`; see there for why), every `DROP_EVERY` bytes and at close.
    `direct`: the tensors come in plan order and are written with O_DIRECT (`DirectFile`), never
    entering the page cache; where the file system refuses O_DIRECT, it writes as without.
    """

    DROP_EVERY = 64 << 20

    def __init__(self, path: str, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None, *,
                 direct: bool = False):
        self.path = path
        self._undropped = 0
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise ValueError(f"{path}: duplicate tensor names in the write plan")
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.offsets: dict[str, int] = {}
        off = 0
        for s in specs:
            header[s.name] = {"dtype": st_dtype(s.dtype), "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
            self.offsets[s.name] = off
            off += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)  # data starts 8-byte aligned, as safetensors itself writes
        self.data_start = 8 + len(raw)
        self.total = self.data_start + off
        self._written: set[str] = set()
        head = struct.pack("<Q", len(raw)) + raw
        self._direct: DirectFile | None = None
        if direct:
            try:
                self._direct = DirectFile(path, self.total)
            except OSError:  # no O_DIRECT here (some FUSE and network file systems)
                pass
        if self._direct is not None:
            self._next = 0  # data offset the next tensor must start at
            self._direct.write(np.frombuffer(head, np.uint8))
            return
        self._f = open(path, "wb")  # noqa: SIM115  (held open across write() calls; closed in close/abort)
        self._f.write(head)
        self._f.truncate(self.total)

    def write(self, name: str, array: np.ndarray) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise ValueError(f"{self.path}: tensor {name!r} is not in the write plan")
        array = np.asarray(array)
        if tuple(array.shape) != spec.shape or array.dtype != spec.dtype:
            raise ValueError(f"{self.path}: tensor {name!r} is {array.dtype}{list(array.shape)}, "
                             f"planned {np.dtype(spec.dtype)}{list(spec.shape)}")
        if name in self._written:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        if self._direct is not None:
            if self.offsets[name] != self._next:
                raise ValueError(f"{self.path}: tensor {name!r} arrived out of plan order (direct writes are "
                                 f"sequential)")
            self._direct.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            self._next += spec.nbytes
            self._written.add(name)
            return
        self._f.seek(self.data_start + self.offsets[name])
        if spec.nbytes:
            self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._written.add(name)
        self._undropped += spec.nbytes
        if self._undropped >= self.DROP_EVERY:
            # starts write-back of these pages and drops those already written back (earlier tensors)
            self._f.flush()
            drop_cached(self._f.fileno(), sync=False)
            self._undropped = 0

    @property
    def complete(self) -> bool:
        """Every planned tensor written."""
        return len(self._written) == len(self.specs)

    def close(self) -> None:
        missing = sorted(set(self.specs) - self._written)
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: {len(missing)} planned tensors never written, e.g. {missing[:3]}")
        if self._direct is not None:
            self._direct.close()
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            drop_cached(self._f.fileno(), sync=False)
        finally:
            self._f.close()

    def abort(self) -> None:
        if self._direct is not None:
            self._direct.abort()
        else:
            self._f.close()


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy split in order, like diffusers/transformers `split_torch_state_dict_into_shards`."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(n: int, single: str = SINGLE_NAME) -> list[str]:
    if n == 1:
        return [single]
    stem, ext = single.rsplit(".", 1)
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]


def write_safetensors_file(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> str:
    """One safetensors file from an in-memory dict (LoRAs, small files), written atomically."""
    path = os.fspath(path)
    specs = [TensorSpec(k, tuple(np.shape(v)), np.asarray(v).dtype) for k, v in tensors.items()]
    with atomic_path(path, overwrite=overwrite) as tmp:
        w = SafetensorsWriter(tmp, specs, metadata)
        try:
            for k, v in tensors.items():
                w.write(k, v)
        except BaseException:
            w.abort()
            raise
        w.close()
    return path


def write_behind(items: Iterable[tuple[str, np.ndarray]], write: Callable[[str, np.ndarray], None], *,
                 depth: int = 2) -> None:
    """`write(name, value)` for every item, on one writer thread while this thread produces the next item.

    Reading and transposing the next tensor overlap the copy of this one into the file. At most
    `depth` items wait. The first error on either side stops both and is raised here.
    """
    pending: queue.Queue = queue.Queue(maxsize=depth)
    failed: list[BaseException] = []

    def run() -> None:
        while (item := pending.get()) is not None:
            if not failed:  # after a failure, only drain (the producer is stopping)
                try:
                    write(*item)
                except BaseException as e:  # noqa: BLE001  (re-raised on the producer's thread)
                    failed.append(e)

    worker = threading.Thread(target=run, name="safetensors-writer", daemon=True)
    worker.start()
    try:
        for item in items:
            if failed:
                break
            pending.put(item)
    finally:
        pending.put(None)
        worker.join()
    if failed:
        raise failed[0]


def write_sharded(
    folder: str,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    single_name: str = SINGLE_NAME,
    index_name: str = INDEX_NAME,
    metadata: Mapping[str, str] | None = None,
    progress: Any = None,
    release: Callable[[np.ndarray], None] | None = None,
    direct: bool = False,
) -> list[str]:
    """Write planned tensors into `folder` as one file or shards + index (folder must exist).

    `tensors` may arrive in any order; each is written straight to its offset, on a writer thread
    while the next one is produced (`write_behind`); `release(value)` is called once a value is
    written (e.g. `ScratchBuffers.give`). `progress` is an optional tqdm bar advanced by bytes.
    `direct`: the tensors arrive in `specs` order; written with O_DIRECT (`SafetensorsWriter`).
    """
    groups = plan_shards(specs, parse_size(max_shard_size))
    names = shard_names(len(groups), single_name)
    meta = {"format": "pt", **(metadata or {})}
    writers: dict[str, SafetensorsWriter] = {}
    owner: dict[str, str] = {}
    for fname, group in zip(names, groups):
        writers[fname] = SafetensorsWriter(os.path.join(folder, fname), group, meta, direct=direct)
        owner.update({s.name: fname for s in group})

    def write(name: str, value: np.ndarray) -> None:
        if name not in owner:
            raise ValueError(f"{folder}: tensor {name!r} is not in the write plan")
        w = writers[owner[name]]
        w.write(name, value)
        if release is not None:
            release(value)
        if w.complete:  # synced and its buffers freed now, not after the last shard
            writers.pop(owner[name]).close()
        if progress is not None:
            progress.update(w.specs[name].nbytes)

    try:
        write_behind(tensors, write)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: owner[s.name] for s in specs}}
        with open(os.path.join(folder, index_name), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    return names
