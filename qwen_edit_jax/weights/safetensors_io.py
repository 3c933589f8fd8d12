"""Reading diffusers-layout safetensors checkpoints tensor by tensor (memory-mapped).

`TensorSource` opens a transformer folder (config.json + one file, or shards + index), or a
single .safetensors file, and hands out numpy arrays (bf16 via ml_dtypes) one at a time or as
slices, so no caller ever needs the whole checkpoint in memory. `save_tensors` / `load_tensors`:
whole small files held in memory (cache shards, sampled latents). `RangedSafetensorsFile`: a file in a
bucket read by byte ranges (the training cache on `gs://`), through the same header parser.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; safetensors needs it)
import numpy as np
from safetensors.numpy import save_file

from ..errors import CheckpointError
from ..utils import storage
from ..utils.files import atomic_path
from .arrays import transpose_2d
from .buffers import drop_cached

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAMES = (INDEX_NAME, "model.safetensors.index.json")  # diffusers, transformers
_MAX_HEADER = 100 * 1024 * 1024  # as the safetensors library

# safetensors dtype string ⇄ numpy dtype name: the one table for reading and writing
ST_TO_NUMPY = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
               "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
NUMPY_TO_ST = {v: k for k, v in ST_TO_NUMPY.items()}


def np_dtype(st: str) -> np.dtype:
    """safetensors dtype string ('BF16', …) → numpy dtype."""
    try:
        return np.dtype(ST_TO_NUMPY[st])
    except KeyError:
        raise CheckpointError(f"safetensors dtype {st!r} is not supported") from None


def st_dtype(dtype: object) -> str:
    """numpy dtype → safetensors dtype string (BF16, F32 …)."""
    name = np.dtype(dtype).name
    try:
        return NUMPY_TO_ST[name]
    except KeyError:
        raise ValueError(f"dtype {name} cannot be stored in safetensors") from None


TensorInfo = tuple[np.dtype, tuple[int, ...], int, str]  # dtype, shape, offset in the data section, st dtype


def parse_header(path: str, size: int, read: Callable[[int, int], bytes]) -> tuple[dict[str, str], int,
                                                                                  dict[str, TensorInfo]]:
    """A safetensors file's header, validated against the file's `size`: (metadata, data start, tensors).

    `read(start, end)` returns the file's bytes [start, end) (a local file or ranges of an object).
    """
    if size < 8:
        raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > size - 8 or n > _MAX_HEADER:
        raise CheckpointError(f"{path}: not a readable safetensors file (header length {n} does not fit "
                              f"the file's {size} bytes: truncated or not safetensors)")
    try:
        header = json.loads(read(8, 8 + n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (header: {e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    info: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            st, shape, (b, e) = entry["dtype"], tuple(int(x) for x in entry["shape"]), entry["data_offsets"]
            dt = np.dtype(ST_TO_NUMPY[st])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has an invalid header entry {entry!r}") from None
        if not 0 <= b <= e or e - b != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} header is inconsistent (shape {list(shape)} "
                                  f"{st}, offsets {[b, e]})")
        if e > data_size:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated: tensor {key!r} ends at "
                                  f"byte {data_start + e}, the file has {size})")
        info[key] = (dt, shape, b, st)
    return metadata, data_start, info


class _Header:
    """What both readers know from the header: names, shapes, dtypes."""

    _info: dict[str, TensorInfo]

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][1]

    def st_dtype(self, key: str) -> str:
        return self._info[key][3]

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def read_many(self, keys: Sequence[str]) -> list[np.ndarray]:
        """Copies of the tensors `keys`, in order."""
        return [self.read(k) for k in keys]


class SafetensorsFile(_Header):
    """One safetensors file, memory-mapped, with a validated header.

    Reads copy only the requested slice out of the mapping and then drop the mapping's pages
    (`madvise(MADV_DONTNEED)`; they stay in the OS page cache), so streaming a 40 GB checkpoint
    never grows this process's resident memory beyond the tensors it actually holds.
    `stream` (a reader that reads each tensor once, the converter): each tensor is read ahead in one
    go (`MADV_WILLNEED`) and its pages leave the page cache after the read (`buffers.drop_cached`), so
    the next read reuses them. (Reading with O_DIRECT into reused buffers measured no faster here.)
    """

    def __init__(self, path: str, *, stream: bool = False):
        self.path = path
        self.stream = stream
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e})") from None
        with f:
            size = os.fstat(f.fileno()).st_size

            def read(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)

            self.metadata, self.data_start, self._info = parse_header(path, size, read)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > self.data_start else None

    def _madvise(self, advice: int, start: int, length: int) -> None:
        try:
            self._mm.madvise(advice, start, length)
        except (AttributeError, OSError, ValueError):  # platform without madvise: only a hint anyway
            pass

    def read(self, key: str, index: tuple = (), *, out: np.ndarray | None = None,
             transpose: bool = False) -> np.ndarray:
        """A copy of `tensor[index]` (basic indexing), touching only the pages the slice covers.

        `transpose` (2-D slices): the slice's transpose, copied tile by tile straight from the mapped
        file. `out`: write there (cast to its dtype) instead of a new array — no intermediate copy.
        """
        dt, shape, b, _ = self._info[key]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        start = self.data_start + b
        lo = start - start % mmap.PAGESIZE
        if nbytes == 0 or self._mm is None:
            src = np.zeros(shape, dt)[tuple(index)]
        else:
            if self.stream:  # the whole tensor is wanted: read it ahead in one go, not fault by fault
                self._madvise(mmap.MADV_WILLNEED, lo, start + nbytes - lo)
            src = np.ndarray(shape, dt, buffer=self._mm, offset=start)[tuple(index)]
        if transpose:
            out = transpose_2d(src, out)
        elif out is not None:
            out[...] = src
        else:
            out = np.array(src, copy=True)
        del src
        if nbytes == 0 or self._mm is None:
            return out
        self._madvise(mmap.MADV_DONTNEED, lo, start + nbytes - lo)
        if self.stream:
            drop_cached(self.path, sync=False, offset=lo, length=start + nbytes - lo)
        return out


class RangedSafetensorsFile(_Header):
    """One safetensors file read by byte ranges (a `gs://` object, `utils.storage.read_ranges`): the header
    once, then only the bytes of the tensors asked for — a host reads its samples of a cache shard, not the
    shard. `read_many` fetches adjacent tensors as one range, the ranges of one call concurrently.
    `bytes_read` counts every byte fetched (header included)."""

    def __init__(self, path: str):
        self.path = path
        self.bytes_read = 0
        try:
            size = storage.size(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e})") from None
        self.metadata, self.data_start, self._info = parse_header(path, size, lambda a, b: self._fetch([(a, b)])[0])

    def _fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        out = storage.read_ranges(self.path, ranges)
        self.bytes_read += sum(len(b) for b in out)
        return out

    def read(self, key: str) -> np.ndarray:
        return self.read_many([key])[0]

    def read_many(self, keys: Sequence[str]) -> list[np.ndarray]:
        spans = []  # (start, end, key): each tensor's bytes in the file
        for k in dict.fromkeys(keys):
            dt, shape, off, _ = self._info[k]
            start = self.data_start + off
            spans.append((start, start + int(np.prod(shape, dtype=np.int64)) * dt.itemsize, k))
        ranges: list[tuple[int, int, list]] = []  # adjacent tensors merged into one range
        for a, b, k in sorted(spans):
            if ranges and a <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(b, ranges[-1][1]), ranges[-1][2] + [(a, b, k)])
            else:
                ranges.append((a, b, [(a, b, k)]))
        arrays = {}
        for (start, end, members), blob in zip(ranges, self._fetch([(a, b) for a, b, _ in ranges])):
            if len(blob) != end - start:
                raise CheckpointError(f"{self.path}: truncated (bytes {start}-{end} gave {len(blob)})")
            for a, _, k in members:
                dt, shape, _, _ = self._info[k]
                n = int(np.prod(shape, dtype=np.int64))
                arrays[k] = np.frombuffer(blob, dt, count=n, offset=a - start).reshape(shape).copy()
        return [arrays[k] for k in keys]


class TensorSource:
    """Name → tensor access over one or more safetensors files, with an optional key prefix strip."""

    def __init__(self, files: dict[str, str], description: str, strip_prefix: str = ""):
        self._files = files  # key (as stored) → file path
        self._handles: dict[str, object] = {}
        self.description = description
        self.strip_prefix = strip_prefix
        self.stream = False  # see `SafetensorsFile`; set before the first read

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "TensorSource":
        path = os.fspath(path)
        if os.path.isdir(path):
            for name in INDEX_NAMES:
                if os.path.exists(os.path.join(path, name)):
                    return cls.from_index(os.path.join(path, name))
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if SINGLE_NAME in files:
                files = [SINGLE_NAME]
            if not files:
                raise CheckpointError(f"{path}: no .safetensors files (and no {INDEX_NAME})")
            keys: dict[str, str] = {}
            for f in files:
                fp = os.path.join(path, f)
                for k in SafetensorsFile(fp).keys():
                    if k in keys:
                        raise CheckpointError(f"{fp}: key {k!r} also appears in {keys[k]}")
                    keys[k] = fp
            return cls(keys, path)
        if path.endswith(".json"):
            return cls.from_index(path)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such file or folder")
        return cls({k: path for k in SafetensorsFile(path).keys()}, path)

    @classmethod
    def from_index(cls, index_path: str) -> "TensorSource":
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
        base = os.path.dirname(index_path)
        files = {k: os.path.join(base, v) for k, v in weight_map.items()}
        for fp in sorted(set(files.values())):
            if not os.path.exists(fp):
                raise CheckpointError(f"{index_path}: shard {os.path.basename(fp)} is missing")
        return cls(files, os.path.dirname(index_path) or index_path)

    # ---- access --------------------------------------------------------------------------
    def _handle(self, fp: str) -> SafetensorsFile:
        h = self._handles.get(fp)
        if h is None:
            h = self._handles[fp] = SafetensorsFile(fp, stream=self.stream)
        return h

    def _stored(self, key: str) -> str:
        return self.strip_prefix + key

    def keys(self) -> list[str]:
        n = len(self.strip_prefix)
        return [k[n:] for k in self._files if k.startswith(self.strip_prefix)]

    def raw_keys(self) -> list[str]:
        return list(self._files)

    def file_of(self, key: str) -> str:
        return self._files[self._stored(key)]

    def __contains__(self, key: str) -> bool:
        return self._stored(key) in self._files

    def _locate(self, key: str) -> tuple[SafetensorsFile, str, str]:
        stored = self._stored(key)
        if stored not in self._files:
            raise CheckpointError(f"{self.description}: missing tensor {key!r}")
        fp = self._files[stored]
        h = self._handle(fp)
        if stored not in h._info:
            raise CheckpointError(f"{fp}: tensor {stored!r} listed in the index is not in this file")
        return h, stored, fp

    def shape(self, key: str) -> tuple[int, ...]:
        h, stored, _ = self._locate(key)
        return h.shape(stored)

    def dtype(self, key: str) -> str:
        """safetensors dtype string ('BF16', 'F32', …)."""
        h, stored, _ = self._locate(key)
        return h.st_dtype(stored)

    def read_slice(self, key: str, index: tuple[slice, ...], *, out: np.ndarray | None = None,
                   transpose: bool = False) -> np.ndarray:
        """`tensor[index]` (basic slices per axis; `.T` with `transpose`), copying only those bytes from
        the mapped file, into `out` when given.

        Used by sharded loading: each device's shard of a parameter is read without ever
        holding the whole tensor in host memory.
        """
        h, stored, fp = self._locate(key)
        try:
            return h.read(stored, tuple(index), out=out, transpose=transpose)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{fp}: tensor {stored!r} is truncated or corrupt ({e})") from None

    def get(self, key: str) -> np.ndarray:
        return self.read_slice(key, ())


# ---- whole small files: the one path for in-memory dicts -----------------------------------------
def save_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None = None,
                 *, overwrite: bool = False, fsync: bool = False) -> str:
    """Write `{name: array}` held in memory (a cache shard, sampled latents) as one safetensors file,
    atomically (`utils.files.atomic_path`; usual file mode), laid out by the safetensors library itself.

    `metadata` values are stored as strings; `fsync`: the data is on disk before the file takes its
    name. Files too large to hold at once, written tensor by tensor: `weights.writer`.
    """
    path = os.path.abspath(os.fspath(path))
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=meta)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    return path


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as numpy arrays (`SafetensorsFile`: a missing, truncated or
    corrupt file is a `CheckpointError` naming it)."""
    f = SafetensorsFile(os.fspath(path))
    return {k: f.read(k) for k in f.keys()}
