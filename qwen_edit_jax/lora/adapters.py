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
from . import files, formats
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


def _host(mod: Any, name: str) -> np.ndarray | None:
    var = getattr(mod, name, None)
    return None if var is None else to_host(var[...]).astype(F32)  # gathered when spread over several hosts


def _slot_tables(mod: Any, layers: int | None, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank, scale) per [layer][slot] of an adapter: its per-layer tables, or its one rank and scale everywhere."""
    n = 1 if layers is None else layers
    full_rank = mod.lora_A.shape[-1] if mod.lora_type != "lokr" else 1
    if not mod.lora_tables:
        return np.full((n, slots), full_rank), np.full((n, slots), mod.lora_scale, F32)
    scale = _host(mod, "lora_layer_scale").reshape(n, slots)
    mask = _host(mod, "lora_mask")
    ranks = mask.sum(-1).astype(int).reshape(n, slots) if mask is not None else np.full((n, slots), full_rank)
    return np.where(scale > 0, ranks, 0), scale


def _pick(j: int | None, v: np.ndarray) -> np.ndarray:
    return v if j is None else v[j]


def _slot(values: dict[str, np.ndarray], name: str, layer: int | None, j: int | None) -> np.ndarray:
    """The writable view of one layer's (and one q/k/v slot's, for grouped adapters) leaf."""
    v = values[name] if layer is None else values[name][layer]
    return v if j is None else v[j]


def iter_adapter_records(model: Any) -> Iterable[tuple[str, Any]]:
    """(diffusers module name, record) in torch layout for every adapter slice the model holds.

    Records are `files.LoraWeights` / `DoraWeights` / `LokrWeights` with the scale baked in (B·scale; LoKr keeps
    its own alpha/rank), each at its own rank (per-layer plans are sliced); layers without an adapter are skipped.
    Fused split-mode adapters give each of q, k, v its own record; shared-mode LoRA copies the shared A to q, k
    and v and splits B by rows (identity 3).
    """
    entries = _entries_by_flax(model)
    for mpath, mod in _lora_modules(model).items():
        entry = entries[mpath]
        layers = model.config.num_layers if entry.stacked else None
        n_slots = len(entry.torch) if mod.lora_grouped else 1
        ranks, scales = _slot_tables(mod, layers, n_slots)
        leaves = {n: _host(mod, n) for n in ("lora_A", "lora_B", "lora_magnitude", "lokr_w1", "lokr_w2",
                                             "lokr_w2_a", "lokr_w2_b")}
        for li, layer in enumerate(range(layers) if layers is not None else [None]):
            at = {n: (v if v is None or layer is None else v[layer]) for n, v in leaves.items()}
            for j, name in enumerate(entry.torch_modules(layer)):
                slot = j if mod.lora_grouped else 0
                gj = j if mod.lora_grouped else None
                r, s = int(ranks[li, slot]), F32(scales[li, slot])
                if r == 0 or s == 0:
                    continue
                if mod.lora_type == "lokr":
                    if at["lokr_w2"] is not None:
                        w2 = {"w2": _pick(gj, at["lokr_w2"])}
                    else:
                        w2 = {"w2_a": _pick(gj, at["lokr_w2_a"]), "w2_b": _pick(gj, at["lokr_w2_b"])}
                    rank = None if "w2" in w2 else w2["w2_b"].shape[0]
                    # alpha = scale·rank reproduces the scale (incl. a per-layer 0/1 plan factor) in every loader
                    alpha = None if rank is None else float(s) * rank
                    yield name, files.LokrWeights(w1=_pick(gj, at["lokr_w1"]), **w2, alpha=alpha)
                    continue
                a, b = at["lora_A"], at["lora_B"]
                if not entry.fused:
                    aj, bj = a, b  # [in, r], [r, out]
                elif mod.lora_grouped:
                    aj, bj = a[j], b[j]  # [in, r], [r, D]
                else:
                    aj, bj = a, b[:, j, :]
                aj, bj = aj[:, :r], bj[:r]
                bt = np.ascontiguousarray(bj.T)
                a_t, b_t = np.ascontiguousarray(aj.T), (bt if s == 1 else bt * s)
                if mod.lora_type == "dora":
                    m = np.ascontiguousarray(_pick(gj, at["lora_magnitude"]))
                    yield name, files.DoraWeights(a_t, b_t, 1.0, None, m)
                else:
                    yield name, files.LoraWeights(a_t, b_t)


def iter_adapter_weights(model: Any) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
    """(diffusers module name, A [r, in], B·scale [out, r]) for every LoRA / DoRA adapter slice (see
    `iter_adapter_records`)."""
    for name, w in iter_adapter_records(model):
        if w.kind == "lokr":
            raise ValueError("LoKr adapters have no A/B pair: use iter_adapter_records")
        yield name, w.A, w.B


def lora_tensors(model: Any, *, format: str = "diffusers", dtype: Any = None) -> dict[str, np.ndarray]:
    """The model's adapters as a standard separate-q/k/v state dict in `format` key style.

    LoRA: any of `formats.WRITE_STYLES`. DoRA: PEFT keys (`diffusers`: + `….lora_magnitude_vector`). LoKr:
    LyCORIS keys (`comfyui`: `diffusion_model.<m>.lokr_w1`, `kohya`: `lycoris_<m>.lokr_w1`) with `.alpha`.
    """
    if format not in formats.WRITE_STYLES:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {list(formats.WRITE_STYLES)}")
    cast = None if dtype is None else np.dtype(as_dtype(dtype))
    out: dict[str, np.ndarray] = {}

    def put(key: str, v: np.ndarray) -> None:
        out[key] = v if cast is None else v.astype(cast)

    for name, w in iter_adapter_records(model):
        keys = formats.key_names(name, format, w.kind)
        if w.kind == "lokr":
            for part in ("w1", "w2", "w2_a", "w2_b"):
                if getattr(w, part) is not None:
                    put(keys[f"lokr_{part}"], np.ascontiguousarray(getattr(w, part)))
            out[keys["alpha"]] = np.asarray(w.alpha if w.alpha is not None else 1.0, F32)
            continue
        put(keys["A"], w.A)
        put(keys["B"], w.B)
        if "magnitude" in keys:
            put(keys["magnitude"], w.magnitude)
        if "alpha" in keys:
            out[keys["alpha"]] = np.asarray(w.A.shape[0], F32)  # scale already baked into B
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
    """Write the model's adapters as a standard separate-q/k/v safetensors file (atomic).

    Key styles: "diffusers" (`transformer.…lora_A.weight`), "comfyui" (`diffusion_model.…`),
    "kohya" (`lora_unet_…lora_down.weight` + `.alpha` = rank), "diffsynth" (`….lora_A.default.weight`),
    "lightx2v" (`….lora_down.weight`). alpha/rank is baked into B, so every loader applies scale 1 and
    gets the same ΔW. DoRA: "diffusers" (PEFT's `lora_magnitude_vector`); LoKr: "comfyui" or "kohya" (LyCORIS
    keys). `dtype` casts the tensors (default: the adapter dtype, fp32).
    """
    tensors = lora_tensors(model, format=format, dtype=dtype)
    return write_lora_tensors(path, tensors, format=format, metadata=metadata, overwrite=overwrite)


def load_lora_into_adapters(model: Any, path: str | os.PathLike, *, strict: bool = True) -> Any:
    """Set the model's adapter parameters from an adapter file (resume / init), exactly.

    LoRA / DoRA: the file's ΔW = s·B·A is reproduced as `lora_scale · B' A'` with A' = Aᵀ and
    B' = (s/lora_scale)·Bᵀ (DoRA: the magnitude is copied). Ranks must equal the model's (per layer with a
    plan: the file's rank fills the first columns). LoKr: the factors are copied; the decomposition must match.
    Split-mode fused adapters take q, k, v independently; shared-mode ones need identical A for q, k, v (files
    exported from a shared model). Adapters the file does not mention get B = 0 / w2 = 0 (no effect). With
    `strict`, a file module with no adapter in the model is an error.
    """
    path = os.fspath(path)
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters (build it with ModelOptions(lora=LoraConfig(...)))")
    kind = model.options.lora.type
    zero = ("lora_B", "lokr_w2", "lokr_w2_b")
    names = ("lora_A", "lora_B", "lora_magnitude", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    values = {m: {n: (np.zeros(getattr(mod, n).shape, F32) if n in zero else _host(mod, n))
                  for n in names if getattr(mod, n, None) is not None} for m, mod in mods.items()}
    tables = {}
    entries = _entries_by_flax(model)
    for m, mod in mods.items():
        entry = entries[m]
        tables[m] = _slot_tables(mod, model.config.num_layers if entry.stacked else None,
                                 len(entry.torch) if mod.lora_grouped else 1)
    shared_seen: dict[tuple[str, int | None], str] = {}
    for module, w in read_lora(path).items():
        entry, layer, j = locate_module(model, module, path)
        mod = mods.get(entry.flax)
        if mod is None:
            if strict:
                raise LoraError(f"{path}: LoRA module {module} has no adapter in this model "
                                f"(LoraConfig.targets={list(model.options.lora.targets)})")
            continue
        if w.kind != kind:
            raise LoraError(f"{path}: holds {w.kind} adapters, the model is built with lora.type={kind!r}")
        val = values[entry.flax]
        li, slot = (0 if layer is None else layer), (j if mod.lora_grouped else 0)
        rank, scale = (int(tables[entry.flax][0][li, slot]), float(tables[entry.flax][1][li, slot]))
        if rank == 0 or scale == 0:
            if strict:
                raise LoraError(f"{path}: LoRA module {module} has no adapter in this model (lora.include/exclude)")
            continue
        gj = j if mod.lora_grouped else None
        if kind == "lokr":
            for part in ("w1", "w2", "w2_a", "w2_b"):
                got, want = getattr(w, part), val.get(f"lokr_{part}")
                if (got is None) != (want is None) or (
                        got is not None and got.shape != _slot(val, f"lokr_{part}", layer, gj).shape):
                    have = {p: list(getattr(w, p).shape) for p in ("w1", "w2", "w2_a", "w2_b")
                            if getattr(w, p) is not None}
                    raise LoraError(f"{path}: LoKr module {module} has {have}; the model's adapter differs "
                                    f"(lora.rank / lora.lokr_factor)")
            ratio = F32(w.scale / scale)
            for part in ("w1", "w2", "w2_a", "w2_b"):
                if getattr(w, part) is not None:
                    v = getattr(w, part).astype(F32) * (ratio if part in ("w2", "w2_b") else F32(1))
                    _slot(val, f"lokr_{part}", layer, gj)[...] = v
            continue
        if w.rank != rank:
            raise LoraError(f"{path}: LoRA module {module} has rank {w.rank}, the model's adapter has rank {rank}")
        a_new = w.A.astype(F32).T
        b_new = (w.B.astype(F32) * F32(w.scale / scale)).T
        a_slot, b_slot = _slot(val, "lora_A", layer, gj), _slot(val, "lora_B", layer, gj)
        if a_new.shape[0] != a_slot.shape[-2]:
            raise LoraError(f"{path}: LoRA module {module} has A {list(w.A.shape)}; the model's linear has "
                            f"{a_slot.shape[-2]} inputs")
        if kind == "dora":
            _slot(val, "lora_magnitude", layer, gj)[...] = w.magnitude.astype(F32)
        if not entry.fused or mod.lora_grouped:
            a_slot[:, :rank], b_slot[:rank] = a_new, b_new
        else:
            key = (entry.flax, layer)
            if key in shared_seen and not np.array_equal(a_slot, a_new):
                raise LoraError(f"{path}: {module} and {shared_seen[key]} have different A matrices; a shared-mode "
                                f"(qkv_mode='shared') adapter cannot hold them — use qkv_mode='split'")
            shared_seen[key] = module
            a_slot[...] = a_new
            b_slot[:, j, :] = b_new
    for m, mod in mods.items():
        for n, val in values[m].items():
            var = getattr(mod, n)
            old = var[...]  # the host value (same on every process) goes straight into the old sharding
            var.set_value(jax.device_put(np.asarray(val, old.dtype), old.sharding))
    return model
