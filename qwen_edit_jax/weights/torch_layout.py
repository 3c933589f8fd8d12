"""Flax-layout params → the standard PyTorch layout (separate q/k/v, torch `[out, in]`), streamed.

The one place that walks the key map to produce diffusers tensors: the converter's `to_standard`,
exporting a model (`loading.save_transformer`) and `iter_torch_params` all go through
`iter_standard_tensors`, one layer of one leaf at a time, from any `LazyParams`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import as_dtype
from ..utils.files import atomic_path
from . import keymap
from .buffers import ScratchBuffers
from .lazy import LazyParams, layer_shape
from .writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec, write_sharded

BASE_FORMATS = ("diffusers", "diffsynth", "comfyui")


def standard_specs(lazy: LazyParams, cast: np.dtype | None = None) -> list[TensorSpec]:
    """Every diffusers tensor (name, torch shape, dtype) the lazy params map to, in the order
    `iter_standard_tensors` yields them (so files can be written front to back)."""
    shapes = keymap.torch_shapes(lazy.config)
    specs = []
    for path, entry, _fleaf, tleaf in keymap.iter_leaves(lazy.config, lazy.fuse_qkv):
        dt = cast or lazy.dtype(path)
        for layer in (range(lazy.config.num_layers) if entry.stacked else [None]):
            for name in keymap.torch_names_for(entry, tleaf, layer):
                specs.append(TensorSpec(name, shapes[name], np.dtype(dt)))
    return specs


def _read_ahead(fn: Callable[[Any], Any], items: list[Any], enabled: bool) -> Iterator[Any]:
    """`map(fn, items)`, with `enabled` computing the next result on a second thread meanwhile."""
    if not enabled or not items:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(fn, items[0])
        for nxt in [*items[1:], None]:
            result = pending.result()
            pending = pool.submit(fn, nxt) if nxt is not None else None
            yield result


def iter_standard_tensors(lazy: LazyParams, cast: np.dtype | None = None, *, buffers: ScratchBuffers | None = None,
                          read_ahead: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(diffusers name, torch-layout array) one layer of one leaf at a time.

    With `buffers`, every array is taken from them (give it back once written); without, each is a
    new array. `read_ahead`: read the next layer on a second thread while this one is transposed and
    written (a file source, the converter; not for params spread over hosts, whose reads gather).
    """
    cfg = lazy.config
    shapes = keymap.torch_shapes(cfg) if buffers is not None else {}
    items = [(path, entry, fleaf, tleaf, layer) for path, entry, fleaf, tleaf in keymap.iter_leaves(cfg, lazy.fuse_qkv)
             for layer in (range(cfg.num_layers) if entry.stacked else [None])]

    def read(item) -> np.ndarray:
        path, entry, _, _, layer = item
        index = None if layer is None else (slice(layer, layer + 1),)
        held = None if buffers is None else buffers.take(layer_shape(lazy.shape(path), entry.stacked), lazy.dtype(path))
        return lazy.read(path, index, out=held)

    for (path, entry, fleaf, tleaf, layer), value in zip(items, _read_ahead(read, items, read_ahead)):
        names = keymap.torch_names_for(entry, tleaf, layer)
        value = value.reshape(value.shape[1:] if entry.stacked else value.shape)
        if buffers is None:
            tensors = [t if cast is None else t.astype(cast) for t in keymap.from_flax_leaf(fleaf, value, len(names))]
        else:
            outs = [buffers.take(shapes[name], cast or value.dtype) for name in names]
            tensors = keymap.from_flax_leaf(fleaf, value, len(names), outs)
            buffers.give(value)
        yield from zip(names, tensors)


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
    read_ahead: bool = False,
) -> str:
    """Write base weights in the standard PyTorch layout (separate q/k/v, torch `[out, in]`).

    Streams: reads into reused buffers, writes on a writer thread with O_DIRECT (`writer`);
    `read_ahead` as `iter_standard_tensors`.
    """
    if format not in BASE_FORMATS:
        raise ValueError(f"--format {format!r} is a LoRA key style; base models are written as "
                         f"{', '.join(BASE_FORMATS)} (diffsynth reads the diffusers folder)")
    out = os.fspath(output)
    cast = None if dtype is None else np.dtype(as_dtype(dtype))
    specs = standard_specs(lazy, cast)
    bar = _bar(sum(s.nbytes for s in specs), "to_standard", progress)
    buffers = ScratchBuffers()
    stream = _counting(iter_standard_tensors(lazy, cast, buffers=buffers, read_ahead=read_ahead), bar, len(specs))
    try:
        if format == "comfyui":  # one file, bare diffusers names (as ComfyUI's repacks)
            with atomic_path(out, overwrite=overwrite) as tmp:
                write_sharded(os.path.dirname(tmp), specs, stream, max_shard_size=sum(s.nbytes for s in specs) + 1,
                              single_name=os.path.basename(tmp), progress=bar, release=buffers.give, direct=True)
        else:
            with atomic_path(out, overwrite=overwrite, is_dir=True) as tmp:
                lazy.config.to_json(os.path.join(tmp, "config.json"))
                write_sharded(tmp, specs, stream, max_shard_size=max_shard_size, progress=bar, release=buffers.give,
                              direct=True)
    finally:
        if bar is not None:
            bar.close()
    return out
