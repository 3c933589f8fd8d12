"""PyTorch checkpoints ⇄ merged Flax params, for base models and LoRAs (the converter's library side).

`convert(input, output, direction)` detects what `input` is (`layout.detect`) and:

* base model, `to_merged`: any layout → merged Orbax checkpoint (`checkpoint.save_merged`),
  streamed layer by layer, source dtype kept unless `dtype`;
* base model, `to_standard`: any layout → a diffusers folder (config.json + shards + index;
  DiffSynth reads it too) or, with `format="comfyui"`, one safetensors file; bit-exact;
* LoRA, `to_merged`: separate q/k/v → fused `attn.to_qkv` / `attn.add_qkv_proj` (stacked A,
  block-diagonal B, exact), other modules unchanged, same key style;
* LoRA, `to_standard`: any key style (fused names included) → separate q/k/v in `format`.

Outputs are atomic (temporary name, renamed when complete); an existing output is replaced only
with `overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..config import DiTConfig, as_dtype
from . import keymap, layout
from .checkpoint import save_merged
from .loader import LazyParams, open_lazy_params
from .safetensors_io import CheckpointError
from .writer import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsWriter,
    TensorSpec,
    atomic_path,
    check_target,
    write_safetensors_file,
    write_sharded,
)

DIRECTIONS = ("to_merged", "to_standard")
BASE_FORMATS = ("diffusers", "diffsynth", "comfyui")


@dataclasses.dataclass
class ConvertResult:
    detected: layout.Detected
    output: str
    direction: str
    written: str  # what was written, in words
    tensors: int
    nbytes: int
    seconds: float


# ---- base models: standard layout writer -------------------------------------------------------
def standard_specs(lazy: LazyParams, cast: np.dtype | None = None) -> list[TensorSpec]:
    """Every diffusers tensor (name, torch shape, dtype) the lazy params map to, sorted by name."""
    shapes = keymap.torch_shapes(lazy.config)
    specs = []
    for path, entry, _fleaf, tleaf in keymap.iter_leaves(lazy.config):
        dt = cast or layout.leaf_dtype(lazy, path)
        for layer in (range(lazy.config.num_layers) if entry.stacked else [None]):
            for name in keymap.torch_names_for(entry, tleaf, layer):
                specs.append(TensorSpec(name, shapes[name], np.dtype(dt)))
    return sorted(specs, key=lambda s: s.name)


def iter_standard_tensors(lazy: LazyParams, cast: np.dtype | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(diffusers name, torch-layout array) one layer of one leaf at a time."""
    cfg = lazy.config
    for path, entry, fleaf, tleaf in keymap.iter_leaves(cfg):
        for layer in (range(cfg.num_layers) if entry.stacked else [None]):
            value = lazy.read(path) if layer is None else lazy.read(path, (slice(layer, layer + 1),))[0]
            tensors = keymap.from_flax_leaf(fleaf, value, len(entry.torch))
            for name, t in zip(keymap.torch_names_for(entry, tleaf, layer), tensors):
                yield name, (t if cast is None else t.astype(cast))


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

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


# ---- LoRAs ------------------------------------------------------------------------------------
def convert_lora(input: str, output: str, direction: str, *, format: str = "diffusers", dtype: Any = None,
                 overwrite: bool = False) -> tuple[str, int, int]:
    from ..lora import formats
    from ..lora.io import lora_file_tensors, lora_to_fused, read_lora_file

    lf = read_lora_file(input)
    if direction == "to_merged":
        modules = lora_to_fused(lf)
        style = lf.style if lf.style in formats.WRITE_STYLES else "diffsynth"
        what = f"merged-QKV LoRA ({style} key style, fused attn.to_qkv / attn.add_qkv_proj)"
    else:
        if format not in formats.WRITE_STYLES:
            raise ValueError(f"unknown LoRA --format {format!r}; choose one of {list(formats.WRITE_STYLES)}")
        modules, style = lf.modules, format
        what = f"standard LoRA ({style} key style, separate q/k/v)"
    tensors = lora_file_tensors(modules, format=style, dtype=dtype)
    meta = {"format": "pt", "qwen_edit_jax.lora_format": style}
    write_safetensors_file(output, tensors, metadata=meta, overwrite=overwrite)
    return what, len(tensors), sum(t.nbytes for t in tensors.values())


# ---- entry point --------------------------------------------------------------------------------
def convert(
    input: str | os.PathLike,
    output: str | os.PathLike,
    direction: str,
    *,
    config: DiTConfig | str | None = None,
    format: str = "diffusers",
    dtype: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    log: Any = None,
) -> ConvertResult:
    """Convert a base model or LoRA between the standard PyTorch layout and the merged layout."""
    input, output = os.fspath(input), os.fspath(output)
    if direction not in DIRECTIONS:
        raise ValueError(f"--direction must be one of {DIRECTIONS}, got {direction!r}")
    if dtype is not None:
        as_dtype(dtype)  # validate early
    if os.path.abspath(input) == os.path.abspath(output):
        raise ValueError(f"--output {output} is the input; choose another path")
    check_target(output, overwrite)
    t0 = time.perf_counter()
    detected = layout.detect(input)
    if detected.kind == "LoRA":
        if log:
            log(f"detected: {detected.describe()}")
        what, n, nbytes = convert_lora(input, output, direction, format=format, dtype=dtype, overwrite=overwrite)
        return ConvertResult(detected, output, direction, what, n, nbytes, time.perf_counter() - t0)
    lazy = open_lazy_params(input, config)
    detected = getattr(lazy, "detected", detected)
    if log:
        c = lazy.config
        log(f"detected: {detected.describe()}; {c.num_layers} layers, width {c.inner_dim}, "
            f"zero_cond_t={c.zero_cond_t}")
    n_tensors = len(keymap.torch_shapes(lazy.config))
    if direction == "to_merged":
        save_merged(lazy, output, dtype=dtype, overwrite=overwrite, progress=progress, source=input)
        what = "merged Orbax checkpoint (config.json + params/)"
    else:
        save_standard(lazy, output, format=format, dtype=dtype, overwrite=overwrite, progress=progress,
                      max_shard_size=max_shard_size)
        what = ("single safetensors file (ComfyUI)" if format == "comfyui"
                else "diffusers folder (config.json + safetensors)")
    nbytes = _tree_size(output)
    return ConvertResult(detected, output, direction, what, n_tensors, nbytes, time.perf_counter() - t0)


def _tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


__all__ = ["CheckpointError", "ConvertResult", "convert", "convert_lora", "save_standard"]
