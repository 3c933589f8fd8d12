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


# ---- the merge math, once: numpy here, jnp under jit in `merge.apply_lora` (same operators) -----------------
def lora_merge(w: Any, a: Any, b: Any, s: Any) -> Any:
    """W + s·B·A for W `[out, in]`, A `[r, in]`, B `[out, r]` (fp32)."""
    return w + s * (b @ a)


def dora_merge(w: Any, a: Any, b: Any, m: Any, s: Any) -> Any:
    """PEFT's DoRA: m · (W + s·B·A) / ‖W + s·B·A‖, the norm per output row over the inputs."""
    v = w + s * (b @ a)
    return (m / ((v * v).sum(axis=1) ** 0.5))[:, None] * v


def kron(w1: Any, w2: Any) -> Any:
    """kron(w1 `[a, c]`, w2 `[b, d]`) = `[a·b, c·d]` (numpy or jnp)."""
    (a, c), (b, d) = w1.shape, w2.shape
    return (w1[:, None, :, None] * w2[None, :, None, :]).reshape(a * b, c * d)


def lokr_merge(w: Any, w1: Any, w2: Any, s: Any) -> Any:
    """W + s·kron(w1, w2) (LyCORIS LoKr)."""
    return w + s * kron(w1, w2)


MERGES = {"lora": lora_merge, "dora": dora_merge, "lokr": lokr_merge}


@dataclasses.dataclass
class LoraWeights:
    """One module's LoRA in torch layout: ΔW = scale · B @ A."""

    A: np.ndarray  # [r, in]
    B: np.ndarray  # [out, r]
    scale: float = 1.0
    alpha: float | None = None  # as stored in the file (None: no alpha)

    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> np.ndarray:
        """ΔW [out, in] in fp32."""
        return (self.B.astype(F32) * F32(self.scale)) @ self.A.astype(F32)

    def merge_args(self, strength: float = 1.0) -> tuple[str, tuple[np.ndarray, ...], float]:
        """(kind, fp32 arrays, scale) for `MERGES[kind](weight, *arrays, scale)`."""
        return self.kind, (self.A.astype(F32), self.B.astype(F32)), float(strength) * self.scale

    def merged(self, weight: np.ndarray, strength: float = 1.0) -> np.ndarray:
        """The base weight `[out, in]` with this adapter merged at `strength`, in fp32.

        LoRA: W + strength·scale·B·A. DoRA: PEFT's rule with scale·strength as PEFT's `set_scale` /
        diffusers' `set_adapters(weights)` apply it (m unchanged). LoKr: W + strength·ΔW.
        """
        kind, arrays, s = self.merge_args(strength)
        return MERGES[kind](np.asarray(weight, F32), *arrays, F32(s))


@dataclasses.dataclass
class DoraWeights(LoraWeights):
    """One module's DoRA (PEFT): W' = m · (W + scale·B·A) / ‖W + scale·B·A‖ per output row."""

    magnitude: np.ndarray | None = None  # [out]

    kind = "dora"

    def merge_args(self, strength: float = 1.0) -> tuple[str, tuple[np.ndarray, ...], float]:
        arrays = (self.A.astype(F32), self.B.astype(F32), self.magnitude.astype(F32))
        return self.kind, arrays, float(strength) * self.scale


@dataclasses.dataclass
class LokrWeights:
    """One module's LoKr (LyCORIS): ΔW = scale · kron(w1, w2), torch layout; a factor may be given as `_a @ _b`.

    scale = alpha / rank when a factor is rank-decomposed (rank = its `_b`'s first dimension), else 1 — LyCORIS's
    `LokrModule` (alpha is reset to the rank when both factors are full) and diffusers' `_bake_lokr_alpha_`.
    """

    w1: np.ndarray | None = None  # [l, m]
    w1_a: np.ndarray | None = None  # [l, r]
    w1_b: np.ndarray | None = None  # [r, m]
    w2: np.ndarray | None = None  # [k, n]
    w2_a: np.ndarray | None = None  # [k, r]
    w2_b: np.ndarray | None = None  # [r, n]
    alpha: float | None = None

    kind = "lokr"

    @property
    def rank(self) -> int | None:
        """The decomposition rank (None when both factors are full)."""
        for b in (self.w2_b, self.w1_b):
            if b is not None:
                return int(b.shape[0])
        return None

    @property
    def scale(self) -> float:
        r = self.rank
        return 1.0 if r is None or self.alpha is None else float(self.alpha) / r

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(w1, w2) as full fp32 matrices."""
        w1 = self.w1.astype(F32) if self.w1 is not None else self.w1_a.astype(F32) @ self.w1_b.astype(F32)
        w2 = self.w2.astype(F32) if self.w2 is not None else self.w2_a.astype(F32) @ self.w2_b.astype(F32)
        return w1, w2

    @property
    def in_features(self) -> int:
        w1, w2 = self.factors()
        return int(w1.shape[1] * w2.shape[1])

    @property
    def out_features(self) -> int:
        w1, w2 = self.factors()
        return int(w1.shape[0] * w2.shape[0])

    def delta(self) -> np.ndarray:
        return F32(self.scale) * kron(*self.factors())

    def merge_args(self, strength: float = 1.0) -> tuple[str, tuple[np.ndarray, ...], float]:
        return self.kind, self.factors(), float(strength) * self.scale

    merged = LoraWeights.merged


AdapterWeights = LoraWeights | DoraWeights | LokrWeights


@dataclasses.dataclass
class LoraFile:
    """A parsed LoRA file: modules by diffusers name, plus what was detected."""

    path: str
    style: str
    modules: dict[str, AdapterWeights]
    fused_modules: list[str]  # fused names found in the file (to_qkv / add_qkv_proj), already split
    metadata: dict[str, str]

    @property
    def kind(self) -> str:
        """"lora", "dora" or "lokr" (one kind per file)."""
        return next(iter(self.modules.values())).kind

    def describe(self) -> str:
        if self.kind == "lokr":
            ranks = sorted({w.rank or 0 for w in self.modules.values()})
            return f"LoKr, {self.style} key style, {len(self.modules)} modules, decomposition rank {ranks} (0: full)"
        ranks = sorted({w.rank for w in self.modules.values()})
        alphas = any(w.alpha is not None for w in self.modules.values())
        fused = f", {len(self.fused_modules)} fused QKV modules (original merged layout)" if self.fused_modules else ""
        kind = "DoRA" if self.kind == "dora" else "LoRA"
        return (f"{kind}, {self.style} key style, {len(self.modules)} modules, rank {ranks}, "
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
        if pk.part in ("A", "lokr_w1", "lokr_w1_a"):
            styles[pk.style] = styles.get(pk.style, 0) + 1
        if pk.part == "unsupported":
            why = next(v for s, v in formats.UNSUPPORTED_WHY.items() if s in k)
            raise LoraError(f"{path}: {k!r}: {why}")
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

    modules: dict[str, AdapterWeights] = {}
    fused = []
    kinds = {("lokr" if any(p in slot for p in formats.LOKR_PARTS) else "dora" if "magnitude" in slot else "lora")
             for slot in groups.values()}
    if len(kinds) > 1:
        raise LoraError(f"{path}: mixes adapter kinds {sorted(kinds)}; one file holds one kind (LoRA, DoRA or LoKr)")
    for module, slot in groups.items():
        if "lokr" in kinds:
            w = _read_lokr(path, module, slot, get)
            entry, _, j = formats.resolve(module)
            if entry.fused and j is None:
                raise LoraError(f"{path}: LoKr on a fused q|k|v module ({module}) is not supported")
            modules[module] = w
            continue
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
        if "magnitude" in slot:
            m = get(slot["magnitude"]).reshape(-1)
            if m.shape[0] != b.shape[0]:
                raise LoraError(f"{path}: {slot['magnitude']!r} has {m.shape[0]} values, lora_B has {b.shape[0]} rows")
            w = DoraWeights(a, b, float(scale), alpha, m)
        else:
            w = LoraWeights(a, b, float(scale), alpha)
        entry, _, j = formats.resolve(module)
        if entry.fused and j is None and w.kind == "dora":
            raise LoraError(f"{path}: DoRA on a fused q|k|v module ({module}) is not supported")
        if entry.fused and j is None:
            fused.append(module)
            modules.update(_split_fused(module, w, path))
        else:
            modules[module] = w
    style = max(styles, key=styles.get) if styles else "diffsynth"
    return LoraFile(path, style, modules, fused, metadata)


def _read_lokr(path: str, module: str, slot: dict[str, str], get: Any) -> LokrWeights:
    parts = {p.removeprefix("lokr_"): get(slot[p]) for p in formats.LOKR_PARTS if p in slot}
    for side in ("w1", "w2"):
        full, pair = side in parts, (f"{side}_a" in parts, f"{side}_b" in parts)
        if full == any(pair) or (any(pair) and not all(pair)):
            raise LoraError(f"{path}: LoKr module {module} needs lokr_{side} or both lokr_{side}_a and "
                            f"lokr_{side}_b, has {sorted(slot)}")
    if any(v.ndim != 2 for v in parts.values()):
        raise LoraError(f"{path}: LoKr module {module} has a factor that is not a matrix "
                        f"({ {k: list(v.shape) for k, v in parts.items()} }); only linear layers are supported")
    alpha = None
    if "alpha" in slot:
        alpha = float(np.asarray(get(slot["alpha"]), np.float64).reshape(-1)[0])
    w = LokrWeights(**parts, alpha=alpha)
    try:
        w.factors()
    except ValueError as e:
        raise LoraError(f"{path}: LoKr module {module}: factor shapes do not chain ({e})") from None
    return w


def read_lora(path: str | os.PathLike) -> dict[str, AdapterWeights]:
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
        if pk is not None and pk.part in ("A", "B", *formats.LOKR_PARTS):
            return True
    return False


def _plain_only(modules: Mapping[str, Any], what: str, target: str) -> None:
    kinds = {w.kind for w in modules.values()} - {"lora"}
    if kinds:
        raise LoraError(f"{what}: {min(kinds)} adapters cannot be converted to {target}; "
                        f"only plain LoRA files can (merge them into the base instead)")


def lora_to_fused(lora: LoraFile) -> dict[str, LoraWeights]:
    """Separate q/k/v LoRAs → fused `attn.to_qkv` / `attn.add_qkv_proj` LoRAs (original merged layout).

    Identity 2: A = concat(A_q, A_k, A_v) [3r, in], B = block-diag(B_q, B_k, B_v) [3D, 3r]. Each
    piece keeps its own scale by baking s_i / s into its B block, where s is the common scale
    (kept unbaked when q, k, v share one scale, so their values are copied bit for bit).
    Groups where q, k or v is missing get a zero block; other modules pass through unchanged.
    """
    _plain_only(lora.modules, lora.path, "the fused merged-QKV layout")
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
    _plain_only(modules, "LoRA", f"key style {format!r} conversion")
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
