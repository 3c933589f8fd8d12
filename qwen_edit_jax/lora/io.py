"""LoRA files ⇄ the merged-QKV model: read any key style, export standard files, merge, load adapters.

Conventions (torch layout): A `[r, in]`, B `[out, r]`, ΔW = scale · B @ A with scale = alpha/rank
when the file has an `.alpha` (or PEFT metadata), else 1 — qwen_image_dit.md §7's recommendation,
and what diffusers 0.42 does too (older diffusers dropped `.alpha` for lora_A/B files).

Fused QKV (qwen_image_dit.md §7, identities 1–3):
* import of separate q/k/v LoRAs is exact: merged into the base kernel slice by slice, or loaded
  into split-mode adapters (one rank-r adapter per q/k/v slice, the grouped form of a rank-3r
  adapter with stacked A and block-diagonal B);
* export of a fused LoRA to separate q/k/v copies the shared A and splits B by rows;
* a fused `to_qkv` LoRA file (original PyTorch merged layout) is read the same way, except that a
  block-diagonal B (what `to_merged` writes) gives back the exact separate q/k/v pieces.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..weights import keymap
from ..weights.safetensors_io import CheckpointError, SafetensorsFile
from ..weights.writer import write_safetensors_file
from . import formats

F32 = np.float32


class LoraError(CheckpointError):
    """A LoRA file is malformed or does not fit the model; the message names the file and key."""


@dataclasses.dataclass
class LoraWeights:
    """One module's LoRA in torch layout: ΔW = scale · B @ A."""

    A: np.ndarray  # [r, in]
    B: np.ndarray  # [out, r]
    scale: float = 1.0
    alpha: float | None = None  # as stored in the file (None: no alpha)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> np.ndarray:
        """ΔW [out, in] in fp32."""
        return (self.B.astype(F32) * F32(self.scale)) @ self.A.astype(F32)


@dataclasses.dataclass
class LoraFile:
    """A parsed LoRA file: modules by diffusers name, plus what was detected."""

    path: str
    style: str
    modules: dict[str, LoraWeights]
    fused_modules: list[str]  # fused names found in the file (to_qkv / add_qkv_proj), already split
    metadata: dict[str, str]

    def describe(self) -> str:
        ranks = sorted({w.rank for w in self.modules.values()})
        alphas = any(w.alpha is not None for w in self.modules.values())
        fused = f", {len(self.fused_modules)} fused QKV modules (original merged layout)" if self.fused_modules else ""
        return (f"LoRA, {self.style} key style, {len(self.modules)} modules, rank {ranks}, "
                f"{'with' if alphas else 'no'} alpha{fused}")


# ---- reading -------------------------------------------------------------------------------
def _peft_scales(metadata: Mapping[str, str]) -> Any:
    """Scale function from diffusers/PEFT `lora_adapter_metadata` (None if absent)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}
    alpha = cfg.get("lora_alpha")
    if alpha is None:
        return None
    patterns = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))

    def scale(module: str, rank: int) -> tuple[float, float]:
        a = float(alpha)
        for pat, val in patterns.items():
            if re.match(rf"(.*\.)?({pat})$", module):  # peft.utils.other.get_pattern_key's rule
                a = float(val)
                break
        return (a / np.sqrt(rank) if rslora else a / rank), a

    return scale


def _split_fused(module: str, w: LoraWeights, path: str) -> dict[str, LoraWeights]:
    """A fused q|k|v LoRA (A [r, in], B [3D, r]) → three separate LoRAs.

    If B is block-diagonal over three equal rank groups (stacked A, as `to_merged` writes), each
    piece gets its own A rows and B block (exact, no copy of zeros); otherwise A is shared and B is
    split by rows (identity 3).
    """
    entry, layer, _ = formats.resolve(module)
    out_rows = w.B.shape[0]
    if out_rows % 3:
        raise LoraError(f"{path}: fused LoRA {module}.lora_B has {out_rows} rows, not divisible by 3 (q|k|v)")
    d, r = out_rows // 3, w.rank
    names = entry.torch_modules(layer)
    rows = [slice(i * d, (i + 1) * d) for i in range(3)]
    block_diag = False
    if r % 3 == 0:
        g = r // 3
        block_diag = all(not np.any(w.B[rows[i], c * g:(c + 1) * g]) for i in range(3) for c in range(3) if c != i)
    parts = {}
    for i, name in enumerate(names):
        if block_diag:
            g = r // 3
            cols = slice(i * g, (i + 1) * g)
            # scale = alpha/(3g) for the fused module; keep the same product for the piece.
            parts[name] = LoraWeights(w.A[cols], w.B[rows[i], cols], w.scale, None if w.alpha is None else w.alpha / 3)
        else:
            parts[name] = LoraWeights(w.A, w.B[rows[i]], w.scale, w.alpha)
    return parts


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Parse a LoRA safetensors file in any supported key style (see `formats`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoraError(f"{path}: LoRA file not found")
    handle = SafetensorsFile(path)
    metadata = dict(handle.metadata)
    keys = list(handle.keys())
    groups: dict[str, dict[str, str]] = {}
    styles: dict[str, int] = {}
    not_lora = []
    for k in keys:
        pk = formats.parse_key(k)
        if pk is None:
            not_lora.append(k)
            continue
        slot = groups.setdefault(pk.module, {})
        if pk.part in slot:
            raise LoraError(f"{path}: module {pk.module} has two {pk.part} tensors ({slot[pk.part]!r} and {k!r})")
        slot[pk.part] = k
        if pk.part == "A":
            styles[pk.style] = styles.get(pk.style, 0) + 1
    if not_lora:
        raise LoraError(f"{path}: {len(not_lora)} keys are not LoRA tensors (lora_A/lora_B, lora_down/lora_up, "
                        f"alpha), e.g. {not_lora[:3]}; is this a base model rather than a LoRA?")
    if not groups:
        raise LoraError(f"{path}: no LoRA tensors found")
    unknown = sorted(m for m in groups if formats.resolve(m) is None)
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} LoRA module names match nothing in QwenImageTransformer2DModel, "
                        f"e.g. {unknown[:3]} (key {groups[unknown[0]].get('A') or next(iter(groups[unknown[0]].values()))!r})")
    peft_scale = _peft_scales(metadata)

    def get(key: str) -> np.ndarray:
        try:
            return handle.read(key)
        except Exception as e:
            raise LoraError(f"{path}: tensor {key!r} is truncated or corrupt ({e})") from None

    modules: dict[str, LoraWeights] = {}
    fused = []
    for module, slot in groups.items():
        if "A" not in slot or "B" not in slot:
            have = next(iter(slot.values()))
            raise LoraError(f"{path}: module {module} has no lora_{'A' if 'A' not in slot else 'B'} "
                            f"(found {have!r})")
        a, b = get(slot["A"]), get(slot["B"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{path}: {slot['A']!r} {list(a.shape)} and {slot['B']!r} {list(b.shape)} are not a "
                            f"rank-r pair (A [r, in], B [out, r])")
        alpha = None
        if "alpha" in slot:
            av = np.asarray(get(slot["alpha"]), dtype=np.float64)
            if av.size != 1:
                raise LoraError(f"{path}: {slot['alpha']!r} should be a scalar, has shape {list(av.shape)}")
            alpha = float(av.reshape(()))
            scale = alpha / a.shape[0]
        elif peft_scale is not None:
            scale, _ = peft_scale(module, a.shape[0])
        else:
            scale = 1.0
        w = LoraWeights(a, b, float(scale), alpha)
        entry, _, j = formats.resolve(module)
        if entry.fused and j is None:
            fused.append(module)
            modules.update(_split_fused(module, w, path))
        else:
            modules[module] = w
    style = max(styles, key=styles.get) if styles else "diffsynth"
    return LoraFile(path, style, modules, fused, metadata)


def read_lora(path: str | os.PathLike) -> dict[str, LoraWeights]:
    """{diffusers module name: LoraWeights (A [r, in], B [out, r], scale)} from a file in any key style."""
    return read_lora_file(path).modules


def is_lora_file(path: str | os.PathLike) -> bool:
    """True if a safetensors file holds LoRA tensors (any key style)."""
    path = os.fspath(path)
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    for k in SafetensorsFile(path).keys():
        pk = formats.parse_key(k)
        if pk is not None and pk.part in ("A", "B"):
            return True
    return False


# ---- model helpers ----------------------------------------------------------------------------
def _module(model: Any, flax_path: str) -> Any:
    m = model
    for part in flax_path.split("."):
        m = getattr(m, part)
    return m


def _locate(model: Any, module: str, path: str) -> tuple[keymap.ModuleEntry, int | None, int | None]:
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
            entry, layer, j = _locate(model, module, path)
            kernel = _module(model, entry.flax).kernel
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
        var = _module(model, flax_path).kernel
        if layer is None:
            var.set_value(_merged_top(var[...], a, b))
        else:
            var.set_value(_merged_stacked_jit(var[...], jnp.int32(layer), a, b, j=j))
    return model


# ---- adapters in the model ⇄ standard files ----------------------------------------------------
def _lora_modules(model: Any) -> dict[str, Any]:
    """Flax module path → Linear, for every linear carrying an active adapter."""
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        mpath = ".".join(map(str, path[:-1]))
        mod = _module(model, mpath)
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
        a_all = np.asarray(mod.lora_A[...], F32)
        b_all = np.asarray(mod.lora_B[...], F32)
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
    from ..config import as_dtype

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
    "kohya" (`lora_unet_…lora_down.weight` + `.alpha` = rank), "diffsynth" (`….lora_A.default.weight`).
    alpha/rank is baked into B, so every loader applies scale 1 and gets the same ΔW.
    `dtype` casts the tensors (default: the adapter dtype, fp32).
    """
    tensors = lora_tensors(model, format=format, dtype=dtype)
    meta = {"format": "pt", "qwen_edit_jax.lora_format": format}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return write_safetensors_file(path, tensors, metadata=meta, overwrite=overwrite)


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
    values = {m: [np.array(mod.lora_A[...], F32), np.zeros(mod.lora_B.shape, F32)] for m, mod in mods.items()}
    shared_seen: dict[tuple[str, int | None], str] = {}
    for module, w in read_lora(path).items():
        entry, layer, j = _locate(model, module, path)
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
            old = var[...]
            sharding = getattr(old, "sharding", None)
            new = jnp.asarray(val, old.dtype)
            var.set_value(jax.device_put(new, sharding) if sharding is not None else new)
    return model


def lora_to_fused(lora: LoraFile) -> dict[str, LoraWeights]:
    """Separate q/k/v LoRAs → fused `attn.to_qkv` / `attn.add_qkv_proj` LoRAs (original merged layout).

    Identity 2: A = concat(A_q, A_k, A_v) [3r, in], B = block-diag(B_q, B_k, B_v) [3D, 3r]. Each
    piece keeps its own scale by baking s_i / s into its B block, where s is the common scale
    (kept unbaked when q, k, v share one scale, so their values are copied bit for bit).
    Groups where q, k or v is missing get a zero block; other modules pass through unchanged.
    """
    out: dict[str, LoraWeights] = {}
    groups: dict[tuple[str, int], dict[int, LoraWeights]] = {}
    for module, w in lora.modules.items():
        entry, layer, j = formats.resolve(module)
        if entry.fused and j is not None:
            groups.setdefault((entry.flax, layer), {})[j] = w
        else:
            out[module] = w
    fused_of = {e.flax: rel for rel, e in formats.fused_names().items()}
    for (flax, layer), parts in groups.items():
        ranks = {w.rank for w in parts.values()}
        any_w = next(iter(parts.values()))
        if len(ranks) > 1:
            raise LoraError(f"{lora.path}: q/k/v LoRAs of block {layer} {fused_of[flax]} have different ranks "
                            f"{sorted(ranks)}; the fused layout needs one rank")
        r = ranks.pop()
        d_out, d_in = any_w.B.shape[0], any_w.A.shape[1]
        scales = {w.scale for w in parts.values()}
        common = scales.pop() if len(scales) == 1 else 1.0
        alphas = {w.alpha for w in parts.values()}
        alpha = alphas.pop() if len(alphas) == 1 and len(parts) == 3 else None
        dtype = np.result_type(*[w.A.dtype for w in parts.values()], *[w.B.dtype for w in parts.values()])
        a = np.zeros((3 * r, d_in), dtype)
        b = np.zeros((3 * d_out, 3 * r), dtype)
        for j in range(3):
            w = parts.get(j)
            if w is None:
                continue
            a[j * r:(j + 1) * r] = w.A
            bj = w.B if w.scale == common else (w.B.astype(F32) * F32(w.scale / common)).astype(dtype)
            b[j * d_out:(j + 1) * d_out, j * r:(j + 1) * r] = bj
        if alpha is not None and common != 1.0:
            out[f"{keymap.BLOCKS}.{layer}.{fused_of[flax]}"] = LoraWeights(a, b, common, alpha * 3)
        else:
            if common != 1.0:
                b = (b.astype(F32) * F32(common)).astype(dtype)
            out[f"{keymap.BLOCKS}.{layer}.{fused_of[flax]}"] = LoraWeights(a, b, 1.0, None)
    return out


def lora_file_tensors(modules: Mapping[str, LoraWeights], *, format: str, dtype: Any = None) -> dict[str, np.ndarray]:
    """A {module: LoraWeights} dict → tensors in a write style.

    Styles with an alpha key (kohya) store alpha (= rank when the file had none); the others bake
    any scale ≠ 1 into B so that every loader applies scale 1. `dtype` casts A and B.
    """
    from ..config import as_dtype

    cast = None if dtype is None else np.dtype(as_dtype(dtype))
    out: dict[str, np.ndarray] = {}
    for name in sorted(modules):
        w = modules[name]
        keys = formats.key_names(name, format)
        a, b = w.A, w.B
        if "alpha" in keys:
            alpha = w.alpha if w.alpha is not None else float(w.rank) * w.scale
            out[keys["alpha"]] = np.asarray(alpha, F32)
        elif w.scale != 1.0:
            b = (b.astype(F32) * F32(w.scale)).astype(b.dtype)
        out[keys["A"]] = a if cast is None else a.astype(cast)
        out[keys["B"]] = b if cast is None else b.astype(cast)
    return out
