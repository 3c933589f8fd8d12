"""Merge adapter files (LoRA, DoRA, LoKr) into a model's base weights (exact to fp32), in place."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import LoraError
from ..weights import keymap
from .files import MERGES, read_lora

F32 = np.float32


# ---- model helpers ----------------------------------------------------------------------------
def module_at(model: Any, flax_path: str) -> Any:
    m = model
    for part in flax_path.split("."):
        m = getattr(m, part)
    return m


def locate_module(model: Any, module: str, path: str) -> tuple[keymap.ModuleEntry, int | None, int | None]:
    hit = keymap.find_module(module, fuse_qkv=model.options.fuse_qkv)
    if hit is None:
        raise LoraError(f"{path}: LoRA module {module} has no linear in this model")
    entry, layer, j = hit
    if entry.stacked and not 0 <= layer < model.config.num_layers:
        raise LoraError(f"{path}: LoRA module {module} is beyond the model's {model.config.num_layers} layers "
                        f"(does the LoRA belong to another model?)")
    return entry, layer, (j if entry.fused else None)


def _normalize_specs(specs: Any) -> list[tuple[str, float]]:
    if isinstance(specs, (str, os.PathLike)):
        return [(os.fspath(specs), 1.0)]
    out = []
    for s in specs:
        if isinstance(s, (str, os.PathLike)):
            out.append((os.fspath(s), 1.0))
        else:
            p, scale = s
            out.append((os.fspath(p), float(scale)))
    return out


@partial(jax.jit, static_argnames=("kinds", "layer_axis", "j"), donate_argnums=(0,))
def _merge_into(kernel, layer, arrays, scales, *, kinds, layer_axis, j):
    """Merge adapters (`files.MERGES[kind]`, in order, fp32) into one torch-layout slice of a Flax kernel.

    kernel `[in, out]`, or stacked `[L, in, out]` / fused `[L, in, 3, out]` (slice `layer`, q/k/v `j`).
    """
    sl = jax.lax.dynamic_index_in_dim(kernel, layer, axis=0, keepdims=False) if layer_axis else kernel
    w = (sl if j is None else sl[:, j]).astype(jnp.float32).T  # [out, in]
    with jax.default_matmul_precision("highest"):
        for kind, arrs, s in zip(kinds, arrays, scales):
            w = MERGES[kind](w, *arrs, s)
    new = w.T.astype(kernel.dtype)
    if j is not None:
        new = sl.at[:, j].set(new)
    return jax.lax.dynamic_update_index_in_dim(kernel, new, layer, axis=0) if layer_axis else new


def apply_lora(model: Any, specs: Any) -> Any:
    """Merge adapter file(s) — LoRA, DoRA, LoKr, any key style — into the model's base weights, in place.

    `specs`: a path, or a list of paths / (path, strength) pairs. Each linear's weight is taken to fp32 once,
    every file's adapter for it is merged in order with the records' own rule (`files.MERGES`, the math of
    `LoraWeights.merged` / `DoraWeights.merged` / `LokrWeights.merged`), and the result rounded to the
    parameter dtype once, so merging is exact to fp32.
    """
    pending: dict[tuple[str, int | None, int | None], list[tuple[str, tuple, float]]] = {}
    for path, strength in _normalize_specs(specs):
        for module, w in read_lora(path).items():
            entry, layer, j = locate_module(model, module, path)
            kernel = module_at(model, entry.flax).kernel
            in_dim = kernel.shape[1] if entry.stacked else kernel.shape[0]
            out_dim = kernel.shape[-1]
            if w.in_features != in_dim or w.out_features != out_dim:
                raise LoraError(f"{path}: {w.kind} adapter for {module} is {w.in_features} → {w.out_features}; the "
                                f"model's linear is {in_dim} → {out_dim} (does it belong to another model size?)")
            pending.setdefault((entry.flax, layer, j), []).append(w.merge_args(strength))
    for (flax_path, layer, j), items in pending.items():
        var = module_at(model, flax_path).kernel
        kinds = tuple(k for k, _, _ in items)
        arrays = tuple(a for _, a, _ in items)
        scales = tuple(np.float32(s) for _, _, s in items)
        var.set_value(_merge_into(var[...], jnp.int32(0 if layer is None else layer), arrays, scales, kinds=kinds,
                                  layer_axis=layer is not None, j=j))
    return model
