"""Writing safetensors checkpoints tensor by tensor, atomically.

`SafetensorsWriter` lays out a file's header from a plan (name, shape, dtype) before any data
exists, then streams each tensor to its offset, so a shard never has to be held in memory.
`save_diffusers` writes a diffusers-style transformer folder (config.json + one file, or shards
+ `diffusion_pytorch_model.safetensors.index.json`) from a model or any (name, array) stream.

Every output goes to a temporary name beside the target and is renamed only when complete;
an existing target is replaced only with `overwrite=True` (and never deleted before the new
output is in place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (numpy bfloat16 / float8)
import numpy as np

from .safetensors_io import INDEX_NAME, SINGLE_NAME

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # diffusers' default ("5GB" as 5 GiB-ish; any value works)

_ST_DTYPES = {
    "bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64",
    "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def st_dtype(dtype: Any) -> str:
    """numpy dtype → safetensors dtype string (BF16, F32 …)."""
    name = np.dtype(dtype).name
    try:
        return _ST_DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name} cannot be stored in safetensors") from None


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


# ---- atomic outputs ---------------------------------------------------------------------------
_UMASK = os.umask(0)
os.umask(_UMASK)


def check_target(path: str, overwrite: bool) -> None:
    """Refuse to touch an existing output unless `overwrite`."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure delete it.

    With `overwrite`, an existing `path` is moved aside first and removed only after the new
    output has been renamed into place, so a failure never leaves neither.
    """
    path = os.path.abspath(os.fspath(path))
    check_target(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(path)
    if is_dir:
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        os.chmod(tmp, 0o777 & ~_UMASK)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        check_target(path, overwrite)
        old = None
        if os.path.lexists(path):
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
        os.rename(tmp, path)
        tmp = None
        if old is not None:
            _remove(old)
    finally:
        if tmp is not None:
            _remove(tmp)


def _remove(p: str) -> None:
    for _ in range(3):  # a background writer may still be closing files
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)
        if not os.path.lexists(p):
            return


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


# ---- diffusers transformer folders ------------------------------------------------------------
def save_diffusers(
    model_or_named_tensors: Any,
    path: str | os.PathLike,
    *,
    config: Any = None,
    dtype: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Write a diffusers-style transformer folder: config.json + safetensors (one file or shards + index).

    `model_or_named_tensors`: a `QwenImageTransformer` (its base weights are streamed through
    `api.iter_torch_params`, one tensor at a time), a `{name: array}` mapping, or an iterable of
    (name, array) pairs (then gathered into memory to plan the file; fine for tiny models).
    `config` (a `DiTConfig`) is required unless a model is given. `dtype` casts every tensor.
    Atomic: written to a temporary folder beside `path`, renamed when complete.
    """
    from ..config import DiTConfig, as_dtype

    cast = None if dtype is None else np.dtype(as_dtype(dtype))
    if hasattr(model_or_named_tensors, "config") and hasattr(model_or_named_tensors, "transformer_blocks"):
        from ..api import iter_torch_params
        from . import keymap

        model = model_or_named_tensors
        config = config or model.config
        shapes = keymap.torch_shapes(config)
        from flax import nnx

        dtypes = {}
        flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        for fpath, entry, _fleaf, tleaf in keymap.iter_leaves(config, model.options.fuse_qkv):
            for layer in (range(config.num_layers) if entry.stacked else [None]):
                for n in keymap.torch_names_for(entry, tleaf, layer):
                    dtypes[n] = np.dtype(flat[fpath].dtype)
        specs = [TensorSpec(n, shapes[n], cast or dtypes[n]) for n in sorted(shapes)]
        stream: Iterable[tuple[str, np.ndarray]] = iter_torch_params(model)
    else:
        if not isinstance(config, DiTConfig):
            raise ValueError("save_diffusers: pass config=DiTConfig(...) when writing named tensors")
        items = model_or_named_tensors
        if not isinstance(items, Mapping):
            items = dict(items)
        specs = [TensorSpec(n, tuple(np.shape(v)), cast or np.asarray(v).dtype) for n, v in sorted(items.items())]
        stream = items.items()
    if cast is not None:
        stream = ((n, np.asarray(v).astype(cast)) for n, v in stream)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="write diffusers")
    out = os.fspath(path)
    try:
        with atomic_path(out, overwrite=overwrite, is_dir=True) as tmp:
            config.to_json(os.path.join(tmp, "config.json"))
            write_sharded(tmp, specs, stream, max_shard_size=max_shard_size, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return out
