"""Reading diffusers-layout safetensors checkpoints tensor by tensor (memory-mapped).

`TensorSource` opens a transformer folder (config.json + one file, or shards + index), or a
single .safetensors file, and hands out numpy arrays (bf16 via ml_dtypes) one at a time or as
slices, so no caller ever needs the whole checkpoint in memory.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; safetensors needs it)
import numpy as np
from safetensors import safe_open

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent; the message names file and key."""


def _safe_open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises SafetensorError / OSError for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


class TensorSource:
    """Name → tensor access over one or more safetensors files, with an optional key prefix strip."""

    def __init__(self, files: dict[str, str], description: str, strip_prefix: str = ""):
        self._files = files  # key (as stored) → file path
        self._handles: dict[str, object] = {}
        self.description = description
        self.strip_prefix = strip_prefix

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "TensorSource":
        path = os.fspath(path)
        if os.path.isdir(path):
            index = os.path.join(path, INDEX_NAME)
            if os.path.exists(index):
                return cls.from_index(index)
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if SINGLE_NAME in files:
                files = [SINGLE_NAME]
            if not files:
                raise CheckpointError(f"{path}: no .safetensors files (and no {INDEX_NAME})")
            keys: dict[str, str] = {}
            for f in files:
                fp = os.path.join(path, f)
                for k in _safe_open(fp).keys():
                    if k in keys:
                        raise CheckpointError(f"{fp}: key {k!r} also appears in {keys[k]}")
                    keys[k] = fp
            return cls(keys, path)
        if path.endswith(".json"):
            return cls.from_index(path)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such file or folder")
        return cls({k: path for k in _safe_open(path).keys()}, path)

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
    def _handle(self, fp: str):
        h = self._handles.get(fp)
        if h is None:
            h = self._handles[fp] = _safe_open(fp)
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

    def _slice(self, key: str):
        stored = self._stored(key)
        if stored not in self._files:
            raise CheckpointError(f"{self.description}: missing tensor {key!r}")
        fp = self._files[stored]
        try:
            return self._handle(fp).get_slice(stored), fp
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{fp}: cannot read tensor {stored!r} ({e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        sl, _ = self._slice(key)
        return tuple(sl.get_shape())

    def dtype(self, key: str) -> str:
        sl, _ = self._slice(key)
        return sl.get_dtype()

    def get(self, key: str) -> np.ndarray:
        sl, fp = self._slice(key)
        try:
            return sl[:]
        except Exception as e:  # truncated data region
            raise CheckpointError(f"{fp}: tensor {self._stored(key)!r} is truncated or corrupt ({e})") from None

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start:stop] of the first axis, reading only those bytes."""
        sl, fp = self._slice(key)
        try:
            return sl[start:stop]
        except Exception as e:
            raise CheckpointError(f"{fp}: tensor {self._stored(key)!r} is truncated or corrupt ({e})") from None

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self.keys():
            yield k, self.get(k)

    def nbytes(self) -> int:
        total = 0
        for k in self.keys():
            sl, _ = self._slice(k)
            total += int(np.prod(sl.get_shape())) * np.dtype(_np_dtype(sl.get_dtype())).itemsize
        return total


_DT = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32",
       "U8": "uint8", "BOOL": "bool", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _np_dtype(st_dtype: str) -> str:
    return _DT.get(st_dtype, "float32")
