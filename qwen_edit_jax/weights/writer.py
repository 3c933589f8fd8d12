"""Writing safetensors checkpoints tensor by tensor, atomically.

`SafetensorsWriter` lays out a file's header from a plan (name, shape, dtype) before any data
exists, then streams each tensor to its offset, so a shard never has to be held in memory.
`write_sharded` splits planned tensors into diffusers-style shards + index.

Every output goes to a temporary name beside the target and is renamed only when complete;
an existing target is replaced only with `overwrite=True` (and never deleted before the new
output is in place).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (numpy bfloat16 / float8)
import numpy as np

from ..utils.files import atomic_path
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
class SafetensorsWriter:
    """Write one safetensors file whose tensors are known (name, shape, dtype) in advance.

    The header is written first; `write(name, array)` puts each tensor at its offset in any order.
    `close()` checks every planned tensor was written.
    """

    def __init__(self, path: str, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = path
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
        self._f = open(path, "wb")  # noqa: SIM115  (held open across write() calls; closed in close/abort)
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
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
        self._f.seek(self.data_start + self.offsets[name])
        if spec.nbytes:
            self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._written.add(name)

    def close(self) -> None:
        missing = sorted(set(self.specs) - self._written)
        try:
            if missing:
                raise ValueError(f"{self.path}: {len(missing)} planned tensors never written, e.g. {missing[:3]}")
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def abort(self) -> None:
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
) -> list[str]:
    """Write planned tensors into `folder` as one file or shards + index (folder must exist).

    `tensors` may arrive in any order; each is written straight to its offset. `progress` is an
    optional tqdm bar advanced by bytes.
    """
    groups = plan_shards(specs, parse_size(max_shard_size))
    names = shard_names(len(groups), single_name)
    meta = {"format": "pt", **(metadata or {})}
    writers: dict[str, SafetensorsWriter] = {}
    owner: dict[str, str] = {}
    for fname, group in zip(names, groups):
        writers[fname] = SafetensorsWriter(os.path.join(folder, fname), group, meta)
        owner.update({s.name: fname for s in group})
    try:
        for name, value in tensors:
            if name not in owner:
                raise ValueError(f"{folder}: tensor {name!r} is not in the write plan")
            writers[owner[name]].write(name, value)
            if progress is not None:
                progress.update(writers[owner[name]].specs[name].nbytes)
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
