"""Lazy, per-slice access to base weights in Flax layout, whatever the file layout on disk.

`LazyParams` is the contract between checkpoint files and everything that places weights:
`read(path, index)` returns just the requested slice of one Flax parameter (stacked over layers,
q|k|v fused, transposed), reading only the torch tensors that slice touches. Single-host loading
reads whole leaves; sharded loading (`sharding.py`) reads one device's slice per callback.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from ..config import DiTConfig, as_dtype
from . import keymap
from .safetensors_io import CheckpointError, TensorSource

Index = tuple[slice, ...]


class LazyParams(Protocol):
    config: DiTConfig
    description: str

    def paths(self) -> list[str]: ...

    def shape(self, path: str) -> tuple[int, ...]: ...

    def read(self, path: str, index: Index | None = None, dtype: Any = None) -> np.ndarray: ...


def _norm_index(index: Index | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = tuple(index or ())
    index = index + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


class TorchLayoutParams:
    """Flax-layout view of a diffusers-named checkpoint (`TensorSource`)."""

    def __init__(self, source: TensorSource, config: DiTConfig, *, fuse_qkv: bool = True, validate: bool = True):
        self.source, self.config, self.fuse_qkv = source, config, fuse_qkv
        self.description = source.description
        self._expected = keymap.torch_shapes(config)
        self._leaves = {p: (e, fl, tl) for p, e, fl, tl in keymap.iter_leaves(config, fuse_qkv)}
        if validate:
            self.validate()

    def validate(self) -> None:
        """Every expected tensor present with the right shape, nothing unexpected."""
        have = set(self.source.keys())
        missing = sorted(set(self._expected) - have)
        unexpected = sorted(have - set(self._expected))
        if missing:
            raise CheckpointError(
                f"{self.description}: missing {len(missing)} tensors, e.g. {missing[:3]} "
                f"(does the config match the weights? num_layers={self.config.num_layers})")
        if unexpected:
            raise CheckpointError(
                f"{self.description}: {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]} "
                f"(does the config match the weights? num_layers={self.config.num_layers})")
        for name, shape in self._expected.items():
            got = self.source.shape(name)
            if tuple(got) != shape:
                raise CheckpointError(f"{self.source.file_of(name)}: tensor {name} has shape {tuple(got)}, "
                                      f"expected {shape} for this config")

    def paths(self) -> list[str]:
        return list(self._leaves)

    def shape(self, path: str) -> tuple[int, ...]:
        entry, fleaf, _ = self._leaves[path]
        return keymap.flax_leaf_shape(entry, fleaf, self.config)

    def read(self, path: str, index: Index | None = None, dtype: Any = None) -> np.ndarray:
        entry, fleaf, tleaf = self._leaves[path]
        shape = self.shape(path)
        idx = _norm_index(index, shape)
        if entry.stacked:
            layer_idx, inner = idx[0], idx[1:]
            layers = range(layer_idx.start, layer_idx.stop, layer_idx.step)
        else:
            layers, inner = [None], idx
        parts = []
        for layer in layers:
            tensors = [self.source.get(n) for n in keymap.torch_names_for(entry, tleaf, layer)]
            parts.append(keymap.to_flax_leaf(fleaf, tensors)[inner])
        out = np.stack(parts) if entry.stacked else parts[0]
        return out if dtype is None else out.astype(np.dtype(as_dtype(dtype)))


def open_lazy_params(
    path: str | os.PathLike, config: DiTConfig | None = None, *, fuse_qkv: bool = True
) -> LazyParams:
    """Open a diffusers-layout transformer (folder with config.json, index + shards, or one file)."""
    path = os.fspath(path)
    if config is None:
        cfg_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
        if not os.path.exists(cfg_path):
            raise CheckpointError(f"{path}: no config.json beside the weights; pass config= (or --config)")
        config = DiTConfig.from_json(cfg_path)
    return TorchLayoutParams(TensorSource.open(path), config, fuse_qkv=fuse_qkv)


def read_all(lazy: LazyParams, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Every leaf, whole, as numpy (single-host loading)."""
    return {p: lazy.read(p, dtype=dtype) for p in lazy.paths()}
