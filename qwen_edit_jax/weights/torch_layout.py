"""Flax-layout params → the standard PyTorch layout (separate q/k/v, torch `[out, in]`), streamed.

The one place that walks the key map to produce diffusers tensors: the converter's `to_standard`,
exporting a model (`loading.save_transformer`) and `iter_torch_params` all go through
`iter_standard_tensors`, one layer of one leaf at a time, from any `LazyParams`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import as_dtype
from ..utils.files import atomic_path
from . import keymap
from .lazy import LazyParams
from .writer import DEFAULT_MAX_SHARD_SIZE, SafetensorsWriter, TensorSpec, write_sharded

BASE_FORMATS = ("diffusers", "diffsynth", "comfyui")


def standard_specs(lazy: LazyParams, cast: np.dtype | None = None) -> list[TensorSpec]:
    """Every diffusers tensor (name, torch shape, dtype) the lazy params map to, sorted by name."""
    shapes = keymap.torch_shapes(lazy.config)
    specs = []
    for path, entry, _fleaf, tleaf in keymap.iter_leaves(lazy.config, lazy.fuse_qkv):
        dt = cast or lazy.dtype(path)
        for layer in (range(lazy.config.num_layers) if entry.stacked else [None]):
            for name in keymap.torch_names_for(entry, tleaf, layer):
                specs.append(TensorSpec(name, shapes[name], np.dtype(dt)))
    return sorted(specs, key=lambda s: s.name)


def iter_standard_tensors(lazy: LazyParams, cast: np.dtype | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(diffusers name, torch-layout array) one layer of one leaf at a time."""
    cfg = lazy.config
    for path, entry, fleaf, tleaf in keymap.iter_leaves(cfg, lazy.fuse_qkv):
        for layer in (range(cfg.num_layers) if entry.stacked else [None]):
            value = lazy.read(path) if layer is None else lazy.read(path, (slice(layer, layer + 1),))[0]
            tensors = keymap.from_flax_leaf(fleaf, value, len(entry.torch))
            for name, t in zip(keymap.torch_names_for(entry, tleaf, layer), tensors):
                yield name, (t if cast is None else t.astype(cast))


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def _counting(stream, bar, n_total: int):
    for done, (name, t) in enumerate(stream, 1):
        yield name, t
        if bar is not None:
            bar.set_postfix_str(f"tensors {done}/{n_total}", refresh=False)


def save_standard(
    lazy: LazyParams,
    output: str | os.PathLike,
    *,
    format: str = "diffusers",
    dtype: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> str:
    """Write base weights in the standard PyTorch layout (separate q/k/v, torch `[out, in]`)."""
    if format not in BASE_FORMATS:
        raise ValueError(f"--format {format!r} is a LoRA key style; base models are written as "
                         f"{', '.join(BASE_FORMATS)} (diffsynth reads the diffusers folder)")
    out = os.fspath(output)
    cast = None if dtype is None else np.dtype(as_dtype(dtype))
    specs = standard_specs(lazy, cast)
    bar = _bar(sum(s.nbytes for s in specs), "to_standard", progress)
    stream = _counting(iter_standard_tensors(lazy, cast), bar, len(specs))
    try:
        if format == "comfyui":  # one file, bare diffusers names (as ComfyUI's repacks)
            with atomic_path(out, overwrite=overwrite) as tmp:
                w = SafetensorsWriter(tmp, specs, {"format": "pt"})
                try:
                    for name, t in stream:
                        w.write(name, t)
                        if bar is not None:
                            bar.update(w.specs[name].nbytes)
                except BaseException:
                    w.abort()
                    raise
                w.close()
        else:
            with atomic_path(out, overwrite=overwrite, is_dir=True) as tmp:
                lazy.config.to_json(os.path.join(tmp, "config.json"))
                write_sharded(tmp, specs, stream, max_shard_size=max_shard_size, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return out
