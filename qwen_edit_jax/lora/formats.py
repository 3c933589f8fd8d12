"""LoRA key styles for Qwen-Image: parse any of them, write any of the five below (`WRITE_STYLES`).

A LoRA tensor key is `<prefix><module><part>`: the module is a diffusers module name
(`transformer_blocks.3.attn.to_q`), the part is A / B / alpha. Styles:

| style      | key of A                                               | alpha            |
|------------|--------------------------------------------------------|------------------|
| diffusers  | `transformer.<m>.lora_A.weight` (PEFT, `save_lora_weights`) | safetensors metadata (PEFT config), else none |
| comfyui    | `diffusion_model.<m>.lora_A.weight` (also `model.diffusion_model.`, `lora_down/up`) | optional `.alpha` |
| kohya      | `lora_unet_<m with . → _>.lora_down.weight` (musubi-tuner; `lycoris_` too) | `.alpha` |
| lightx2v   | `<m>.lora_down.weight` / `lora_up.weight`              | `.alpha` |
| diffsynth  | `<m>.lora_A.default.weight` (PEFT adapter name kept)    | none (scale 1) |

Module names are resolved with `weights.keymap.find_module` (the one key map); kohya's flattened
names are un-flattened by matching against the same table. Fused names `attn.to_qkv` /
`attn.add_qkv_proj` (the original merged-QKV PyTorch layout) are recognised too.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from ..weights import keymap

WRITE_STYLES = ("diffusers", "comfyui", "kohya", "diffsynth", "lightx2v")
Part = Literal["A", "B", "alpha", "magnitude", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
               "lokr_w2_b", "unsupported"]
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_KOHYA_PREFIXES = ("lora_unet_", "lycoris_")
# Longest first so ".lora_A.default.weight" wins over ".lora_A.weight"-style partial matches.
_SUFFIXES: tuple[tuple[str, Part], ...] = (
    (".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"),
    (".alpha", "alpha"),
    # DoRA (PEFT / diffusers: the magnitude m of W' = m·(W + ΔW)/‖W + ΔW‖, one value per output)
    (".lora_magnitude_vector.default.weight", "magnitude"), (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    # LoKr (LyCORIS): ΔW = kron(w1, w2), either factor possibly rank-decomposed as w_a @ w_b
    *((f".{p}", p) for p in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2")),
    # recognised, refused with a clear error: LyCORIS DoRA scale, LoKr Tucker cores, LoHa
    *((s, "unsupported") for s in (".dora_scale", ".lokr_t1", ".lokr_t2", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a",
                                   ".hada_w2_b", ".hada_t1", ".hada_t2")),
)
UNSUPPORTED_WHY = {".dora_scale": "LyCORIS/kohya DoRA (dora_scale) is not supported; DoRA files need PEFT's "
                                  "lora_magnitude_vector keys",
                   ".lokr_t": "LoKr with Tucker cores (lokr_t1/lokr_t2, conv layers) is not supported",
                   ".hada_": "LoHa (hada_*) adapters are not supported"}
_FUSED_SUFFIX = re.compile(r"^(.*)\.lora_([AB])\.[A-Za-z0-9_]+\.weight$")  # PEFT with a custom adapter name


@dataclasses.dataclass(frozen=True)
class ParsedKey:
    module: str  # diffusers module name (or a fused name: ...attn.to_qkv / attn.add_qkv_proj)
    part: Part
    style: str


def resolve(module: str) -> tuple[keymap.ModuleEntry, int | None, int | None] | None:
    """Module name → (fused-layout entry, layer, index within a q|k|v group or None for a whole fused name)."""
    hit = keymap.find_module(module, fuse_qkv=True)
    if hit is not None:
        entry, layer, j = hit
        if entry.kind != "linear":
            return None
        return entry, layer, (j if entry.fused else None)
    m = re.match(rf"^{keymap.BLOCKS}\.(\d+)\.(.+)$", module)
    if m and m.group(2) in keymap.fused_entries():
        return keymap.fused_entries()[m.group(2)], int(m.group(1)), None
    return None


def _flat_table() -> tuple[dict[str, str], dict[str, str]]:
    """kohya flattened name → dotted name, for top-level modules and block-relative modules."""
    top, block = {}, {}
    for e in keymap.module_entries(fuse_qkv=False):
        if e.kind != "linear":
            continue
        for t in e.torch:
            (block if e.stacked else top)[t.replace(".", "_")] = t
    for rel in keymap.fused_entries():
        block[rel.replace(".", "_")] = rel
    return top, block


def unflatten_kohya(flat: str) -> str | None:
    """'transformer_blocks_0_img_mlp_net_0_proj' → 'transformer_blocks.0.img_mlp.net.0.proj' (None if unknown)."""
    top, block = _flat_table()
    if flat in top:
        return top[flat]
    m = re.match(rf"^{keymap.BLOCKS}_(\d+)_(.+)$", flat)
    if m and m.group(2) in block:
        return f"{keymap.BLOCKS}.{m.group(1)}.{block[m.group(2)]}"
    return None


def parse_key(key: str) -> ParsedKey | None:
    """Split a LoRA tensor key into (module, part, style); None if it is not a LoRA key."""
    part = None
    for suffix, p in _SUFFIXES:
        if key.endswith(suffix):
            body, part = key[: -len(suffix)], p
            break
    if part is None:
        m = _FUSED_SUFFIX.match(key)
        if not m:
            return None
        body, part = m.group(1), m.group(2)
    down_up = ".lora_down." in key or ".lora_up." in key
    for kp in _KOHYA_PREFIXES:
        if body.startswith(kp):
            module = unflatten_kohya(body[len(kp):])
            return ParsedKey(module or body, part, "kohya")
    style = "diffsynth" if ".default." in key else ("lightx2v" if down_up else "")
    for prefix in _PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix):]
            if not style or style == "lightx2v":
                style = "diffusers" if prefix in ("transformer.", "base_model.model.") else "comfyui"
            break
    return ParsedKey(body, part, style or "diffsynth")


def key_names(module: str, style: str, kind: str = "lora") -> dict[str, str]:
    """Keys of one module's tensors in a write style: {'A': …, 'B': …} (+ 'alpha' for kohya and lightx2v).

    kind "dora": + 'magnitude' (`….lora_magnitude_vector`), diffusers style only (what diffusers / PEFT read).
    kind "lokr": {'lokr_w1': …, 'lokr_w2': …, 'lokr_w2_a': …, 'lokr_w2_b': …, 'alpha': …} in LyCORIS keys,
    comfyui (`diffusion_model.<m>.lokr_w1`) or kohya (`lycoris_<m with . → _>.lokr_w1`, as ai-toolkit writes).
    """
    if kind == "dora":
        if style != "diffusers":
            raise ValueError(f"DoRA adapters are written with PEFT's keys (format 'diffusers'), not {style!r}")
        keys = key_names(module, style)
        return {**keys, "magnitude": f"transformer.{module}.lora_magnitude_vector"}
    if kind == "lokr":
        if style == "comfyui":
            base = f"diffusion_model.{module}"
        elif style == "kohya":
            base = "lycoris_" + module.replace(".", "_")
        else:
            raise ValueError(f"LoKr adapters are written with LyCORIS keys: format 'comfyui' or 'kohya', "
                             f"not {style!r}")
        return {p: f"{base}.{p}" for p in (*LOKR_PARTS, "alpha")}
    if style == "diffusers":
        return {"A": f"transformer.{module}.lora_A.weight", "B": f"transformer.{module}.lora_B.weight"}
    if style == "comfyui":
        return {"A": f"diffusion_model.{module}.lora_A.weight", "B": f"diffusion_model.{module}.lora_B.weight"}
    if style == "diffsynth":
        return {"A": f"{module}.lora_A.default.weight", "B": f"{module}.lora_B.default.weight"}
    if style == "kohya":
        flat = "lora_unet_" + module.replace(".", "_")
        return {"A": f"{flat}.lora_down.weight", "B": f"{flat}.lora_up.weight", "alpha": f"{flat}.alpha"}
    if style == "lightx2v":
        return {"A": f"{module}.lora_down.weight", "B": f"{module}.lora_up.weight", "alpha": f"{module}.alpha"}
    raise ValueError(f"unknown LoRA format {style!r}; choose one of {list(WRITE_STYLES)}")
