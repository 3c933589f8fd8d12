"""Trainable LoRA adapters in the model ⇄ standard LoRA files (export for every loader, load to resume).

Split-mode fused adapters hold one rank-r adapter per q/k/v slice (exactly a standard LoRA);
shared-mode ones one A for all three, exported by copying A and splitting B by rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from ..config import as_dtype
from ..errors import LoraError
from ..parallel.distributed import to_host
from ..weights import keymap
from ..weights.writer import write_safetensors_file
from . import formats
from .files import read_lora
from .merge import locate_module, module_at

F32 = np.float32


# ---- adapters in the model ⇄ standard files ----------------------------------------------------
def _lora_modules(model: Any) -> dict[str, Any]:
    """Flax module path → Linear, for every linear carrying an active adapter."""
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        mpath = ".".join(map(str, path[:-1]))
        mod = module_at(model, mpath)
        if getattr(mod, "has_lora", False):
            out[mpath] = mod
    return out


def _entries_by_flax(model: Any) -> dict[str, keymap.ModuleEntry]:
    return {e.flax: e for e in keymap.module_entries(model.options.fuse_qkv)}


def iter_adapter_weights(model: Any) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
    """(diffusers module name, A [r, in], B·scale [out, r]) in torch layout for every adapter slice.

    Fused split-mode adapters give each of q, k, v its own pair; shared-mode ones copy the
    shared A to q, k and v and split B by rows (identity 3). The adapter scale is baked into B.
    """
    entries = _entries_by_flax(model)
    for mpath, mod in _lora_modules(model).items():
        entry = entries[mpath]
        a_all = to_host(mod.lora_A[...]).astype(F32)  # gathered when spread over several hosts
        b_all = to_host(mod.lora_B[...]).astype(F32)
        scale = F32(mod.lora_scale)
        for layer in (range(model.config.num_layers) if entry.stacked else [None]):
            a = a_all if layer is None else a_all[layer]
            b = b_all if layer is None else b_all[layer]
            names = entry.torch_modules(layer)
            for j, name in enumerate(names):
                if not entry.fused:
                    aj, bj = a, b  # [in, r], [r, out]
                elif mod.lora_grouped:
                    aj, bj = a[j], b[j]  # [in, r], [r, D]
                else:
                    aj, bj = a, b[:, j, :]
                bt = np.ascontiguousarray(bj.T)
                yield name, np.ascontiguousarray(aj.T), (bt if scale == 1 else bt * scale)


def lora_tensors(model: Any, *, format: str = "diffusers", dtype: Any = None) -> dict[str, np.ndarray]:
    """The model's adapters as a standard separate-q/k/v LoRA state dict in `format` key style."""
    if format not in formats.WRITE_STYLES:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {list(formats.WRITE_STYLES)}")
    cast = None if dtype is None else np.dtype(as_dtype(dtype))
    out: dict[str, np.ndarray] = {}
    for name, a, b in iter_adapter_weights(model):
        keys = formats.key_names(name, format)
        out[keys["A"]] = a if cast is None else a.astype(cast)
        out[keys["B"]] = b if cast is None else b.astype(cast)
        if "alpha" in keys:
            out[keys["alpha"]] = np.asarray(a.shape[0], F32)  # scale already baked into B
    if not out:
        raise ValueError("the model has no LoRA adapters (build it with ModelOptions(lora=LoraConfig(...)))")
    return out


def write_lora_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], *, format: str,
                       metadata: Mapping[str, Any] | None = None, overwrite: bool = True) -> str:
    """Write a LoRA state dict (from `lora_tensors`) as a safetensors file, atomically, with its key style recorded."""
    meta = {"format": "pt", "qwen_edit_jax.lora_format": format}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return write_safetensors_file(path, tensors, metadata=meta, overwrite=overwrite)


def save_lora(
    model: Any,
    path: str | os.PathLike,
    *,
    format: str = "diffusers",
    dtype: Any = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> str:
    """Write the model's adapters as a standard separate-q/k/v LoRA safetensors file (atomic).

    Key styles: "diffusers" (`transformer.…lora_A.weight`), "comfyui" (`diffusion_model.…`),
    "kohya" (`lora_unet_…lora_down.weight` + `.alpha` = rank), "diffsynth" (`….lora_A.default.weight`),
    "lightx2v" (`….lora_down.weight`). alpha/rank is baked into B, so every loader applies scale 1 and
    gets the same ΔW. `dtype` casts the tensors (default: the adapter dtype, fp32).
    """
    tensors = lora_tensors(model, format=format, dtype=dtype)
    return write_lora_tensors(path, tensors, format=format, metadata=metadata, overwrite=overwrite)


def load_lora_into_adapters(model: Any, path: str | os.PathLike, *, strict: bool = True) -> Any:
    """Set the model's adapter parameters from a LoRA file (resume / init), exactly.

    The file's ΔW = s·B·A is reproduced as `lora_scale · B' A'` with A' = Aᵀ and B' = (s/lora_scale)·Bᵀ.
    Ranks must equal the model's. Split-mode fused adapters take q, k, v independently;
    shared-mode ones need identical A for q, k, v (files exported from a shared model).
    Adapters the file does not mention get B = 0 (no effect). With `strict`, a file module with no
    adapter in the model is an error.
    """
    path = os.fspath(path)
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters (build it with ModelOptions(lora=LoraConfig(...)))")
    values = {m: [to_host(mod.lora_A[...]).astype(F32), np.zeros(mod.lora_B.shape, F32)] for m, mod in mods.items()}
    shared_seen: dict[tuple[str, int | None], str] = {}
    for module, w in read_lora(path).items():
        entry, layer, j = locate_module(model, module, path)
        mod = mods.get(entry.flax)
        if mod is None:
            if strict:
                raise LoraError(f"{path}: LoRA module {module} has no adapter in this model "
                                f"(LoraConfig.targets={list(model.options.lora.targets)})")
            continue
        a_val, b_val = values[entry.flax]
        rank = mod.lora_A.shape[-1]
        if w.rank != rank:
            raise LoraError(f"{path}: LoRA module {module} has rank {w.rank}, the model's adapters have rank {rank}")
        a_new = w.A.astype(F32).T
        b_new = (w.B.astype(F32) * F32(w.scale / mod.lora_scale)).T
        a_slot = a_val if layer is None else a_val[layer]
        b_slot = b_val if layer is None else b_val[layer]
        if a_new.shape != (a_slot.shape[-2],) + (rank,):
            raise LoraError(f"{path}: LoRA module {module} has A {list(w.A.shape)}; the model's linear has "
                            f"{a_slot.shape[-2]} inputs")
        if not entry.fused:
            a_slot[...], b_slot[...] = a_new, b_new
        elif mod.lora_grouped:
            a_slot[j], b_slot[j] = a_new, b_new
        else:
            key = (entry.flax, layer)
            if key in shared_seen and not np.array_equal(a_slot, a_new):
                raise LoraError(f"{path}: {module} and {shared_seen[key]} have different A matrices; a shared-mode "
                                f"(qkv_mode='shared') adapter cannot hold them — use qkv_mode='split'")
            shared_seen[key] = module
            a_slot[...] = a_new
            b_slot[:, j, :] = b_new
    for m, mod in mods.items():
        a_val, b_val = values[m]
        for var, val in ((mod.lora_A, a_val), (mod.lora_B, b_val)):
            old = var[...]  # the host value (same on every process) goes straight into the old sharding
            var.set_value(jax.device_put(np.asarray(val, old.dtype), old.sharding))
    return model
