"""PyTorch checkpoints ⇄ merged Flax params, for base models and LoRAs (the converter's library side).

`convert(input, output, direction)` detects what `input` is (`detect`) and:

* base model, `to_merged`: any layout → merged Orbax checkpoint (`checkpoint.save_merged`),
  streamed layer by layer, source dtype kept unless `dtype`;
* base model, `to_standard`: any layout → a diffusers folder (config.json + shards + index;
  DiffSynth reads it too) or, with `format="comfyui"`, one safetensors file; bit-exact;
* LoRA, `to_merged`: separate q/k/v → fused `attn.to_qkv` / `attn.add_qkv_proj` (stacked A,
  block-diagonal B, exact), other modules unchanged; key style `format` if given, else the input's;
* LoRA, `to_standard`: any key style (fused names included) → separate q/k/v in `format`
  (default diffusers).

What the input is comes from its content (safetensors header, Orbax marker), never its name.
A merged Orbax checkpoint has no key style, so `format` with a base model's `to_merged` is refused.

`merge_loras(base, loras, output)` bakes LoRA files into a base model (the merge command,
convert/merge_lora.py), streamed the same way.

Outputs are atomic (temporary name, renamed when complete); an existing output is replaced only
with `overwrite=True`.

Buckets (`gs://`): a merged checkpoint is written there directly by Orbax, its marker last (the commit
marker, `checkpoint.save_merged`); a LoRA file is written locally and uploaded whole (an object appears
only complete); the standard base layouts (a diffusers folder, a ComfyUI file) are refused, since the
tools that read them want local files: write them locally and copy. A `gs://` input is read in place
when it is a merged checkpoint, else from a local copy (`loader.local_weights`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .config import DiTConfig, as_dtype
from .errors import CheckpointError
from .loading.quantized import QuantizedParams
from .lora import formats
from .lora.files import is_lora_file, lora_file_tensors, lora_to_fused, read_lora_file
from .lora.merge import LoraMergedParams
from .utils import storage
from .utils.files import atomic_path, check_target
from .weights import keymap, layout
from .weights.checkpoint import is_merged_checkpoint, save_merged
from .weights.loader import local_weights, open_lazy_params
from .weights.torch_layout import save_standard
from .weights.writer import DEFAULT_MAX_SHARD_SIZE, write_safetensors_file

DIRECTIONS = ("to_merged", "to_standard")


@dataclasses.dataclass
class ConvertResult:
    detected: layout.Detected
    output: str
    direction: str
    written: str  # what was written, in words
    tensors: int
    nbytes: int
    seconds: float


# ---- LoRAs ------------------------------------------------------------------------------------
def convert_lora(input: str, output: str, direction: str, *, format: str | None = None, dtype: Any = None,
                 overwrite: bool = False) -> tuple[str, int, int]:
    """Convert a LoRA file; `format` is the output key style (default: the input's for `to_merged`,
    diffusers for `to_standard`)."""
    if format is not None and format not in formats.WRITE_STYLES:
        raise ValueError(f"unknown LoRA --format {format!r}; choose one of {list(formats.WRITE_STYLES)}")
    lf = read_lora_file(input)
    if direction == "to_merged":
        modules = lora_to_fused(lf)
        style = format or (lf.style if lf.style in formats.WRITE_STYLES else "diffsynth")
        what = f"merged-QKV LoRA ({style} key style, fused attn.to_qkv / attn.add_qkv_proj)"
    else:
        modules, style = lf.modules, format or "diffusers"
        what = f"standard LoRA ({style} key style, separate q/k/v)"
    tensors = lora_file_tensors(modules, format=style, dtype=dtype)
    meta = {"format": "pt", "qwen_edit_jax.lora_format": style}
    if storage.is_remote(output):  # written locally, uploaded whole
        with tempfile.TemporaryDirectory(prefix="qwen-edit-jax-lora-") as tmp:
            local = write_safetensors_file(os.path.join(tmp, "lora.safetensors"), tensors, metadata=meta)
            storage.upload_file(local, output, overwrite=overwrite)
    else:
        write_safetensors_file(output, tensors, metadata=meta, overwrite=overwrite)
    return what, len(tensors), sum(t.nbytes for t in tensors.values())


def detect(path: str | os.PathLike) -> layout.Detected:
    """Base model or LoRA, and which container / key style (no config needed)."""
    path = os.fspath(path)
    if not storage.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if is_merged_checkpoint(path):
        return layout.Detected(path, "base", "merged Orbax checkpoint (this project)", "Flax merged-QKV params")
    if is_lora_file(path):
        lf = read_lora_file(path)
        return layout.Detected(path, "LoRA", "single safetensors file", lf.describe().removeprefix("LoRA, "))
    _, det = layout.open_torch_source(path)
    return det


# ---- entry point --------------------------------------------------------------------------------
def convert(
    input: str | os.PathLike,
    output: str | os.PathLike,
    direction: str,
    *,
    config: DiTConfig | str | None = None,
    format: str | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    log: Any = None,
    quantize: str | None = None,
) -> ConvertResult:
    """Convert a base model or LoRA between the standard PyTorch layout and the merged layout.

    `format`: the output's key style — base `to_standard`: diffusers (default), diffsynth or comfyui;
    LoRA: any of `lora.formats.WRITE_STYLES` (default: the input's for `to_merged`, diffusers for
    `to_standard`); base `to_merged` writes an Orbax checkpoint, which has none, so it is refused.
    `quantize` ("int8" / "fp8" / "int4", base `to_merged` only): write a quantized merged checkpoint (block kernels
    as 8-bit values + fp32 per-output-channel scales or int4 + per-group scales, `loading.quantized`); load it
    with the same mode.
    """
    input, output = os.fspath(input), os.fspath(output)
    if direction not in DIRECTIONS:
        raise ValueError(f"--direction must be one of {DIRECTIONS}, got {direction!r}")
    if dtype is not None:
        as_dtype(dtype)  # validate early
    storage.check_scheme(input, "--input")
    storage.check_scheme(output, "--output")
    if storage.normalize(input) == storage.normalize(output):
        raise ValueError(f"--output {output} is the input; choose another path")
    if storage.is_remote(output):
        if not overwrite and storage.exists(output):
            raise FileExistsError(f"{output} already exists; pass --overwrite (overwrite=True) to replace it")
    else:
        check_target(output, overwrite)
    t0 = time.perf_counter()
    if storage.is_remote(input) and not is_merged_checkpoint(input):
        input = local_weights(input, progress=progress)
    detected = detect(input)
    if quantize is not None and (detected.kind == "LoRA" or direction != "to_merged"):
        raise ValueError(f"--quantize {quantize} applies to a base model's to_merged output only")
    if detected.kind == "LoRA":
        if log:
            log(f"detected: {detected.describe()}")
        what, n, nbytes = convert_lora(input, output, direction, format=format, dtype=dtype, overwrite=overwrite)
        return ConvertResult(detected, output, direction, what, n, nbytes, time.perf_counter() - t0)
    if direction == "to_standard" and storage.is_remote(output):
        what = "ComfyUI file" if format == "comfyui" else "diffusers folder"
        raise ValueError(f"--output {output}: a bucket takes merged checkpoints (--direction to_merged) and LoRA "
                         f"files; write the {what} to a local path and copy it (gcloud storage cp -r)")
    if direction == "to_merged" and format is not None:
        raise ValueError(f"--format {format} does not apply to a base model's to_merged output (a merged Orbax "
                         f"checkpoint has no key style); drop --format, or use it with --direction to_standard")
    lazy = open_lazy_params(input, config, stream=True)
    detected = getattr(lazy, "detected", detected)
    if log:
        c = lazy.config
        log(f"detected: {detected.describe()}; {c.num_layers} layers, width {c.inner_dim}, "
            f"zero_cond_t={c.zero_cond_t}")
    n_tensors = len(keymap.torch_shapes(lazy.config))
    if direction == "to_standard" and getattr(lazy, "quantize", None):
        raise ValueError(f"{input} is a quantized ({lazy.quantize}) merged checkpoint; the standard layouts hold "
                         f"float weights: convert the float original instead")
    if direction == "to_merged":
        if quantize is not None:
            lazy = QuantizedParams(lazy, quantize)
        save_merged(lazy, output, dtype=dtype, overwrite=overwrite, progress=progress, source=input)
        what = "merged Orbax checkpoint (config.json + params/)"
    else:
        save_standard(lazy, output, format=format or "diffusers", dtype=dtype, overwrite=overwrite, progress=progress,
                      max_shard_size=max_shard_size, read_ahead=True)
        what = ("single safetensors file (ComfyUI)" if format == "comfyui"
                else "diffusers folder (config.json + safetensors)")
    nbytes = _tree_size(output)
    return ConvertResult(detected, output, direction, what, n_tensors, nbytes, time.perf_counter() - t0)


# ---- merging LoRAs into a base ------------------------------------------------------------------
MERGE_FORMATS = ("diffusers", "comfyui", "merged")


def is_pipeline_repo(path: str | os.PathLike) -> bool:
    """A diffusers pipeline repo folder (`model_index.json` and `transformer/`), not a bare transformer."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isdir(os.path.join(path, "transformer"))


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link `src` at `dst` (no bytes copied), or copy it where links cannot be made (another filesystem)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _copy_repo_except_transformer(repo: str, dest: str) -> None:
    """Every entry of `repo` but `transformer/` into `dest`, files hard-linked (symlinks followed)."""
    for name in sorted(os.listdir(repo)):
        if name == "transformer":
            continue
        src, dst = os.path.join(repo, name), os.path.join(dest, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def merge_loras(
    base: str | os.PathLike,
    loras: Sequence[Any],
    output: str | os.PathLike,
    *,
    format: str = "diffusers",
    config: DiTConfig | str | None = None,
    dtype: Any = None,
    quantize: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    log: Any = None,
) -> ConvertResult:
    """Write `base` with LoRA files baked in, streamed layer by layer (never the whole model in memory).

    `base`: a diffusers pipeline repo folder (`model_index.json` + `transformer/`) or a transformer
    checkpoint in any layout the converter reads. `loras`: paths or (path, strength) pairs, applied in
    order; every adapter module must match a linear of the base (else a `LoraError` naming the file and
    module). Per weight: W ← record.merged(W, strength) for each file, in fp32, rounded once to the
    output dtype (`dtype`, default the base's).
    `format`: "diffusers" — a transformer folder (config.json + safetensors shards); for a repo base the
    output is the whole repo with only `transformer/` replaced (the other components hard-linked, or
    copied across filesystems), so `from_pretrained(output)` works in diffusers and here; "comfyui" — one
    safetensors file (the transformer only); "merged" — a merged Orbax checkpoint (the transformer only),
    optionally `quantize`d ("int8" / "fp8" / "int4", as the converter's to_merged).
    Atomic: written under a temporary name and renamed when complete; an existing `output` only with
    `overwrite`.
    """
    base, output = os.fspath(base), os.fspath(output)
    if format not in MERGE_FORMATS:
        raise ValueError(f"--format {format!r}: choose one of {list(MERGE_FORMATS)}")
    if quantize is not None and format != "merged":
        raise ValueError(f"--quantize {quantize} needs --format merged (quantized weights exist only as a merged "
                         f"Orbax checkpoint)")
    if dtype is not None:
        as_dtype(dtype)  # validate early
    if not loras:
        raise ValueError("give at least one --lora FILE[:STRENGTH]")
    storage.check_scheme(output, "--output")
    if storage.is_remote(output) and format != "merged":
        raise ValueError(f"--output {output}: a bucket takes --format merged (a merged Orbax checkpoint); write the "
                         f"{format} output to a local path and copy it (gcloud storage cp -r)")
    if not os.path.exists(base):
        raise CheckpointError(f"--base {base}: no such file or folder")
    out_abs, base_abs = os.path.abspath(output), os.path.abspath(base)
    if out_abs == base_abs or out_abs.startswith(base_abs + os.sep) or base_abs.startswith(out_abs + os.sep):
        raise ValueError(f"--output {output} overlaps the base {base}; choose another path")
    check_target(output, overwrite)
    t0 = time.perf_counter()
    repo = is_pipeline_repo(base)
    source = os.path.join(base, "transformer") if repo else base
    lazy = open_lazy_params(source, config, stream=True)
    detected = getattr(lazy, "detected", None) or detect(source)
    if getattr(lazy, "quantize", None):
        raise ValueError(f"--base {base} is a quantized ({lazy.quantize}) checkpoint; merge into the float original")
    merged = LoraMergedParams(lazy, loras)
    if log:
        log(f"base: {detected.describe()}; {lazy.config.num_layers} layers, width {lazy.config.inner_dim}")
        log(f"LoRAs: {merged.modules} adapter modules from {len(loras)} file(s), merged in order")
    if format == "merged":
        params = merged if quantize is None else QuantizedParams(merged, quantize)
        save_merged(params, output, dtype=dtype, overwrite=overwrite, progress=progress, source=base)
        what = f"merged Orbax checkpoint{f' ({quantize})' if quantize else ''} with the LoRA(s) baked in"
    elif format == "comfyui":
        save_standard(merged, output, format="comfyui", dtype=dtype, overwrite=overwrite, progress=progress,
                      read_ahead=True)
        what = "single safetensors file (ComfyUI) with the LoRA(s) baked in"
    elif repo:
        with atomic_path(output, overwrite=overwrite, is_dir=True) as tmp:
            save_standard(merged, os.path.join(tmp, "transformer"), dtype=dtype, progress=progress,
                          max_shard_size=max_shard_size, read_ahead=True)
            _copy_repo_except_transformer(base, tmp)
        what = "diffusers repo folder (transformer/ merged, the other components linked)"
    else:
        save_standard(merged, output, dtype=dtype, overwrite=overwrite, progress=progress,
                      max_shard_size=max_shard_size, read_ahead=True)
        what = "diffusers transformer folder (config.json + safetensors) with the LoRA(s) baked in"
    n_tensors = len(keymap.torch_shapes(lazy.config))
    return ConvertResult(detected, output, "merge", what, n_tensors, _tree_size(output), time.perf_counter() - t0)


def _tree_size(path: str) -> int:
    if storage.is_remote(path):
        return sum(storage.size(storage.join(path, r)) for r in storage.files_under(path)) if storage.isdir(path) \
            else storage.size(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


__all__ = ["MERGE_FORMATS", "CheckpointError", "ConvertResult", "convert", "convert_lora", "detect", "is_pipeline_repo",
           "merge_loras", "save_standard"]
