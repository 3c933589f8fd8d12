"""Merge adapter files (LoRA, DoRA, LoKr) into base weights (exact to fp32): into a loaded model in place
(`apply_lora`), or as a lazy view of base weights on disk that the merge command streams to a file
(`LoraMergedParams`)."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import as_dtype
from ..errors import LoraError
from ..weights import keymap
from ..weights.lazy import Index, LazyParams, check_out, into_out, norm_index
from .files import MERGES, read_lora

F32 = np.float32


# ---- model helpers ----------------------------------------------------------------------------
def module_at(model: Any, flax_path: str) -> Any:
    m = model
    for part in flax_path.split("."):
        m = getattr(m, part)
    return m


def locate(module: str, path: str, num_layers: int, fuse_qkv: bool, *, what: str = "model"
           ) -> tuple[keymap.ModuleEntry, int | None, int | None]:
    """A LoRA file's module → (key-map entry, layer, q/k/v index or None) in a model of `num_layers` blocks;
    a module with no linear or beyond the depth is an error naming the file (`what`: the model, in words)."""
    hit = keymap.find_module(module, fuse_qkv=fuse_qkv)
    if hit is None:
        raise LoraError(f"{path}: LoRA module {module} has no linear in the {what}")
    entry, layer, j = hit
    if entry.stacked and not 0 <= layer < num_layers:
        raise LoraError(f"{path}: LoRA module {module} is beyond the {what}'s {num_layers} layers "
                        f"(does the LoRA belong to another model?)")
    return entry, layer, (j if entry.fused else None)


def locate_module(model: Any, module: str, path: str) -> tuple[keymap.ModuleEntry, int | None, int | None]:
    """`locate` in a built model."""
    return locate(module, path, model.config.num_layers, model.options.fuse_qkv)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'PATH' or 'PATH:STRENGTH' (a command line's --lora) → (path, strength); a STRENGTH that is not a number
    is an error. A file whose own name holds a ':' is taken whole."""
    if os.path.exists(spec):
        return spec, 1.0
    path, sep, tail = spec.rpartition(":")
    if not sep or not path or "/" in tail or tail.endswith(".safetensors"):
        return spec, 1.0  # no strength given (or the ':' belongs to the path)
    try:
        return path, float(tail)
    except ValueError:
        raise ValueError(f"--lora {spec}: the strength {tail!r} after the last ':' is not a number "
                         f"(expected PATH[:SCALE], e.g. {path}:0.8)") from None


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


class LoraMergedParams:
    """`LazyParams` of `lazy` (base weights in any layout) with LoRA files baked into its linear weights.

    `loras`: [(path, strength)], applied in that order. For every linear a LoRA targets, each read takes
    the whole layer in fp32, applies every file's record in turn (`record.merged(W [out, in], strength)`:
    LoRA, and any other adapter record with that method), and rounds once to the source dtype (or the
    requested one); other leaves pass through untouched. Streaming writers (`save_standard`,
    `save_merged`) read one layer at a time, so the merged model is never in memory. Every adapter module
    must map to a linear of this config (checked here, before any read; the error names the file and module).
    """

    def __init__(self, lazy: LazyParams, loras: Any):
        self.lazy, self.config, self.fuse_qkv = lazy, lazy.config, lazy.fuse_qkv
        specs = _normalize_specs(loras)
        self.description = f"{lazy.description} + {len(specs)} LoRA(s)"
        leaves = {p: e for p, e, fleaf, _ in keymap.iter_leaves(lazy.config, lazy.fuse_qkv) if fleaf == "kernel"}
        # kernel leaf → layer (None: unstacked) → [(index in a fused group or None, file, module, record,
        # strength)], in file order
        self._hits: dict[str, dict[int | None, list[tuple[int | None, str, str, Any, float]]]] = {}
        self.modules = 0
        shapes = keymap.torch_shapes(lazy.config)
        for path, strength in specs:
            for module, record in read_lora(path).items():
                # read_lora keeps only modules that resolve to a linear
                entry, layer, j = locate(module, path, lazy.config.num_layers, lazy.fuse_qkv, what="base model")
                leaf = f"{entry.flax}.kernel"
                shape = shapes[f"{module}.weight"]  # [out, in]
                if (record.out_features, record.in_features) != tuple(shape):
                    raise LoraError(f"{path}: {record.kind} adapter for {module} is {record.in_features} → "
                                    f"{record.out_features}; the base weight is {list(shape)} [out, in] (does it "
                                    f"belong to another model size?)")
                self._hits.setdefault(leaf, {}).setdefault(layer, []).append(
                    (j, path, module, record, float(strength)))
                self.modules += 1
        self._stacked = {p: e.stacked for p, e in leaves.items()}

    def paths(self) -> list[str]:
        return self.lazy.paths()

    def shape(self, path: str) -> tuple[int, ...]:
        return self.lazy.shape(path)

    def dtype(self, path: str) -> np.dtype:
        return self.lazy.dtype(path)

    def _merge_layer(self, kernel: np.ndarray, hits: list[tuple[int | None, str, str, Any, float]]) -> np.ndarray:
        """One layer's fp32 kernel `[in, out]` (fused: `[in, 3, out]`) with the records applied in order."""
        for j, path, module, record, strength in hits:
            w = (kernel if j is None else kernel[:, j]).T  # torch layout [out, in]
            try:
                new = np.asarray(record.merged(np.ascontiguousarray(w), strength), F32)
            except (LoraError, ValueError) as e:
                raise LoraError(f"{path}: LoRA module {module}: {e}") from None
            if new.shape != w.shape:
                raise LoraError(f"{path}: LoRA module {module}: merged weight {list(new.shape)} != base "
                                f"{list(w.shape)}")
            if j is None:
                kernel[...] = new.T
            else:
                kernel[:, j] = new.T
        return kernel

    def read(self, path: str, index: Index | None = None, dtype: Any = None, out: np.ndarray | None = None
             ) -> np.ndarray:
        hits = self._hits.get(path)
        if not hits:
            return self.lazy.read(path, index, dtype=dtype, out=out)
        shape = tuple(self.lazy.shape(path))
        idx = norm_index(index, shape)
        dt = np.dtype(as_dtype(dtype)) if dtype is not None else np.dtype(self.dtype(path))
        if not self._stacked[path]:
            kernel = self._merge_layer(np.array(self.lazy.read(path, None, dtype=np.float32), F32), hits[None])
            return into_out(np.ascontiguousarray(kernel[idx]).astype(dt), out, path)
        layers = range(*idx[0].indices(shape[0]))
        sizes = tuple(len(range(*s.indices(n))) for s, n in zip(idx[1:], shape[1:]))
        result = check_out(out, (len(layers), *sizes), dt, path)
        for i, layer in enumerate(layers):
            kernel = np.array(self.lazy.read(path, (slice(layer, layer + 1),), dtype=np.float32)[0], F32)
            if layer in hits:
                kernel = self._merge_layer(kernel, hits[layer])
            result[i] = kernel[idx[1:]].astype(dt)
        return result
