"""Merge LoRA files into a model's base weights (exact to fp32), in place."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import LoraError
from ..weights import keymap
from .files import read_lora

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


@jax.jit
def _merged_top(kernel, a, b):
    delta = jnp.matmul(a.T, b.T, precision=jax.lax.Precision.HIGHEST)  # [in, out]
    return (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)


def _merged_stacked(kernel, layer, a, b, j):
    delta = jnp.matmul(a.T, b.T, precision=jax.lax.Precision.HIGHEST)  # [in, out]
    sl = jax.lax.dynamic_index_in_dim(kernel, layer, axis=0, keepdims=False)
    if j is None:
        new = (sl.astype(jnp.float32) + delta).astype(kernel.dtype)
    else:
        new = sl.at[:, j].set((sl[:, j].astype(jnp.float32) + delta).astype(kernel.dtype))
    return jax.lax.dynamic_update_index_in_dim(kernel, new, layer, axis=0)


_merged_stacked_jit = jax.jit(_merged_stacked, static_argnames=("j",), donate_argnums=(0,))


def apply_lora(model: Any, specs: Any) -> Any:
    """Merge LoRA file(s) into the model's base weights, in place; returns the model.

    `specs`: a path, or a list of paths / (path, strength) pairs. Deltas of all files for one
    linear are summed in fp32 (one matmul of the concatenated ranks) and added to the weight in
    fp32 before rounding to the parameter dtype once, so merging is exact to fp32.
    """
    pending: dict[tuple[str, int | None, int | None], list[tuple[np.ndarray, np.ndarray]]] = {}
    entries: dict[str, keymap.ModuleEntry] = {}
    for path, strength in _normalize_specs(specs):
        for module, w in read_lora(path).items():
            entry, layer, j = locate_module(model, module, path)
            kernel = module_at(model, entry.flax).kernel
            in_dim = kernel.shape[1] if entry.stacked else kernel.shape[0]
            out_dim = kernel.shape[-1]
            if w.A.shape[1] != in_dim or w.B.shape[0] != out_dim:
                raise LoraError(f"{path}: LoRA for {module} has A {list(w.A.shape)}, B {list(w.B.shape)}; the model's "
                                f"linear is {in_dim} → {out_dim} (does the LoRA belong to another model size?)")
            entries[entry.flax] = entry
            pending.setdefault((entry.flax, layer, j), []).append(
                (w.A.astype(F32), w.B.astype(F32) * F32(w.scale * strength)))
    for (flax_path, layer, j), pieces in pending.items():
        a = np.concatenate([p[0] for p in pieces], axis=0)
        b = np.concatenate([p[1] for p in pieces], axis=1)
        var = module_at(model, flax_path).kernel
        if layer is None:
            var.set_value(_merged_top(var[...], a, b))
        else:
            var.set_value(_merged_stacked_jit(var[...], jnp.int32(layer), a, b, j=j))
    return model
