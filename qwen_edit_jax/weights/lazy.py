"""The `LazyParams` contract: per-slice access to base weights in Flax layout, whatever is on disk.

`read(path, index)` returns just the requested slice of one Flax parameter (stacked over layers,
q|k|v fused, transposed), reading only the bytes that slice touches. Loading places each leaf on
its devices through it (one device's slice per callback), the converter streams layer by layer.
`out` lets a streaming caller reuse its buffers (`buffers.ScratchBuffers`).
`check_params` is the one place that compares what a source holds with what a config expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ..config import DiTConfig, as_dtype
from ..errors import CheckpointError
from ..parallel.distributed import to_host

Index = tuple[slice, ...]


class LazyParams(Protocol):
    config: DiTConfig
    description: str
    fuse_qkv: bool  # False: six separate q/k/v projections (the benchmark baseline layout)

    def paths(self) -> list[str]: ...

    def shape(self, path: str) -> tuple[int, ...]: ...

    def dtype(self, path: str) -> np.dtype: ...

    def read(self, path: str, index: Index | None = None, dtype: Any = None, out: np.ndarray | None = None
             ) -> np.ndarray: ...


def norm_index(index: Index | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A basic-slice index padded to every axis, with concrete start/stop/step."""
    index = tuple(index or ())
    index = index + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def layer_shape(shape: tuple[int, ...], stacked: bool) -> tuple[int, ...]:
    """Shape of one layer's read of a leaf (`index=(slice(l, l + 1),)` keeps the layer axis, as 1)."""
    return (1, *shape[1:]) if stacked else tuple(shape)


def check_out(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype, path: str) -> np.ndarray:
    """`out` if it can hold the read (C-contiguous, exact shape and dtype), else a new array when None."""
    if out is None:
        return np.empty(shape, dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"{path}: out is {out.dtype}{list(out.shape)}, the read gives {np.dtype(dtype)}{list(shape)} "
                         f"(C-contiguous)")
    return out


def into_out(value: np.ndarray, out: np.ndarray | None, path: str) -> np.ndarray:
    """`value`, or when `out` is given a copy of it there (checked as `check_out`), returned."""
    if out is None:
        return value
    check_out(out, value.shape, value.dtype, path)[...] = value
    return out


def _some(names: list[str]) -> str:
    return f"{names[:3]}{' …' if len(names) > 3 else ''}"


def check_params(description: str, have: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                 *, hint: str = "", where: Any = None) -> None:
    """Every expected name present with its shape, nothing unexpected; else one `CheckpointError`.

    `where(name)` names the file holding a tensor (for the shape message); `hint` is appended to
    the missing/unexpected messages (e.g. "does the config match the weights?").
    """
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    tail = f" ({hint})" if hint else ""
    if missing:
        raise CheckpointError(f"{description}: missing {len(missing)} tensors, e.g. {_some(missing)}{tail}")
    if unexpected:
        raise CheckpointError(f"{description}: {len(unexpected)} unexpected tensors, e.g. {_some(unexpected)}{tail}")
    for name, shape in expected.items():
        if tuple(have[name]) != tuple(shape):
            src = where(name) if where is not None else description
            raise CheckpointError(f"{src}: tensor {name} has shape {tuple(have[name])}, expected {tuple(shape)} "
                                  f"for this config")


class ArrayParams:
    """`LazyParams` over in-memory arrays (`{flax path: numpy or jax array}`), e.g. a model's own weights."""

    def __init__(self, params: Mapping[str, Any], config: DiTConfig, *, fuse_qkv: bool = True,
                 description: str = "params"):
        self.params, self.config, self.description, self.fuse_qkv = params, config, description, fuse_qkv

    def paths(self) -> list[str]:
        return list(self.params)

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self.params[path].shape)

    def dtype(self, path: str) -> np.dtype:
        return np.dtype(self.params[path].dtype)

    def read(self, path: str, index: Index | None = None, dtype: Any = None, out: np.ndarray | None = None
             ) -> np.ndarray:
        """The slice as numpy; a jax array spread over several hosts is gathered (all processes call this)."""
        value = to_host(self.params[path][norm_index(index, self.shape(path))])
        return into_out(value if dtype is None else value.astype(np.dtype(as_dtype(dtype))), out, path)
