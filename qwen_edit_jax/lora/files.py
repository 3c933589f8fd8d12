"""LoRA files: read any key style into {diffusers module: LoraWeights}, fuse q|k|v, write tensors back.

Conventions (torch layout): A `[r, in]`, B `[out, r]`, ΔW = scale · B @ A with scale = alpha/rank
when the file has an `.alpha` (or PEFT metadata), else 1 — what diffusers 0.42 does too (older
diffusers dropped `.alpha` for lora_A/B files).

Fused QKV (the original merged-QKV PyTorch layout): a fused `to_qkv` LoRA is split into separate
q/k/v pieces on reading — exactly when B is block-diagonal (what `lora_to_fused` writes), else by
sharing A and splitting B by rows; `lora_to_fused` goes the other way (stacked A, block-diagonal B).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..config import as_dtype
from ..errors import CheckpointError, LoraError
from ..weights import keymap
from ..weights.safetensors_io import SafetensorsFile
from . import formats

F32 = np.float32


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

    def merged(self, weight: np.ndarray, strength: float = 1.0) -> np.ndarray:
        """The base weight `[out, in]` with this LoRA baked in: W + strength·scale·B@A, in fp32."""
        delta = (self.B.astype(F32) * F32(self.scale * strength)) @ self.A.astype(F32)
        if delta.shape != weight.shape:
            raise LoraError(f"its delta B@A is {list(delta.shape)} but the base weight is {list(weight.shape)} "
                            f"[out, in] (does the LoRA belong to another model size?)")
        return weight.astype(F32) + delta


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
    """True if `path` is a safetensors file (whatever its name) holding LoRA tensors (any key style)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        keys = SafetensorsFile(path).keys()
    except CheckpointError:
        return False
    for k in keys:
        pk = formats.parse_key(k)
        if pk is not None and pk.part in ("A", "B"):
            return True
    return False


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
    fused_of = {e.flax: rel for rel, e in keymap.fused_entries().items()}
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

    Styles with an alpha key (kohya, lightx2v) store alpha (= rank when the file had none); the others bake
    any scale ≠ 1 into B so that every loader applies scale 1. `dtype` casts A and B.
    """
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
