"""What is this checkpoint? Layout and key-style detection for every input the converter accepts.

Base models: a diffusers transformer folder (config.json + one file, or shards + index), an index
file, or one safetensors file; key names as diffusers/DiffSynth, with ComfyUI prefixes
(`model.diffusion_model.`, `diffusion_model.`) or `transformer.`, or the original merged-QKV
PyTorch layout (`attn.to_qkv.weight [3D, D]`, `attn.add_qkv_proj.*`); or this project's merged
Orbax checkpoint. LoRAs: one safetensors file in any key style (`lora.formats`).

`FusedQKVSource` presents a merged-QKV PyTorch checkpoint under the standard q/k/v names (row
slices of the fused tensors, read lazily), so every reader above it sees one layout.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from ..config import PRESETS, DiTConfig
from ..errors import CheckpointError
from . import keymap
from .safetensors_io import INDEX_NAME, TensorSource

BASE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
ANCHOR = "img_in.weight"
ZERO_COND_T_NOTE = ("zero_cond_t (Qwen-Image-Edit-2511) is not visible in the weights, so a checkpoint without a "
                    "config.json must be told its variant: pass --config path/to/config.json or a preset name "
                    f"({', '.join(sorted(p for p in PRESETS if p != 'tiny'))})")


_FUSED_KEY = re.compile(rf"^({keymap.BLOCKS}\.\d+\.)({'|'.join(map(re.escape, keymap.fused_entries()))})\.(weight|bias)$")


class FusedQKVSource:
    """A `TensorSource` view that splits original merged-QKV tensors into standard q/k/v tensors."""

    def __init__(self, source: TensorSource):
        self.source = source
        self.description = source.description
        self._virtual: dict[str, tuple[str, int]] = {}  # standard name → (fused key, index j)
        self._plain: list[str] = []
        groups = {rel: e.torch for rel, e in keymap.fused_entries().items()}
        for k in source.keys():
            m = _FUSED_KEY.match(k)
            if not m:
                self._plain.append(k)
                continue
            rows = source.shape(k)[0]
            if rows % 3:
                raise CheckpointError(f"{source.file_of(k)}: fused tensor {k} has {rows} rows, not divisible by 3 (q|k|v)")
            for j, t in enumerate(groups[m.group(2)]):
                self._virtual[f"{m.group(1)}{t}.{m.group(3)}"] = (k, j)
        dup = sorted(set(self._virtual) & set(self._plain))
        if dup:
            raise CheckpointError(f"{self.description}: both fused and separate q/k/v tensors present, e.g. {dup[0]}")

    def keys(self) -> list[str]:
        return self._plain + list(self._virtual)

    def __contains__(self, key: str) -> bool:
        return key in self._virtual or key in self.source

    def file_of(self, key: str) -> str:
        return self.source.file_of(self._virtual[key][0] if key in self._virtual else key)

    def dtype(self, key: str) -> str:
        return self.source.dtype(self._virtual[key][0] if key in self._virtual else key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._virtual:
            return self.source.shape(key)
        fk, _ = self._virtual[key]
        shape = self.source.shape(fk)
        return (shape[0] // 3, *shape[1:])

    def read_slice(self, key: str, index: tuple[slice, ...], *, out: np.ndarray | None = None,
                   transpose: bool = False) -> np.ndarray:
        if key not in self._virtual:
            return self.source.read_slice(key, index, out=out, transpose=transpose)
        fk, j = self._virtual[key]
        n = self.shape(key)[0]
        index = tuple(index) + (slice(None),) * (len(self.shape(key)) - len(index))
        r = slice(*index[0].indices(n))
        rows = slice(r.start + j * n, r.stop + j * n, r.step)
        return self.source.read_slice(fk, (rows, *index[1:]), out=out, transpose=transpose)

    def get(self, key: str) -> np.ndarray:
        return self.read_slice(key, ())


@dataclasses.dataclass
class Detected:
    """What an input path holds, in words and in data."""

    path: str
    kind: str  # "base" | "lora"
    container: str  # "merged Orbax checkpoint" | "diffusers folder (…)" | "safetensors file" | …
    key_style: str  # "diffusers/DiffSynth names" | "ComfyUI prefix 'model.diffusion_model.'" | …
    prefix: str = ""
    fused_qkv: bool = False
    config_source: str = ""

    def describe(self) -> str:
        parts = [self.kind if self.kind == "LoRA" else "base model", self.container, self.key_style]
        if self.config_source:
            parts.append(f"config from {self.config_source}")
        return ", ".join(p for p in parts if p)


def _container(path: str, source: TensorSource) -> str:
    files = sorted({source.file_of(k) for k in source.keys()} | set())
    if os.path.isdir(path) or path.endswith(".json"):
        has_index = os.path.exists(os.path.join(path, INDEX_NAME)) or path.endswith(".json")
        return f"diffusers folder ({len(files)} shard{'s' if len(files) != 1 else ''}{' + index' if has_index else ''})"
    return "single safetensors file"


def find_prefix(source: TensorSource) -> str:
    raw = set(source.raw_keys())
    for p in BASE_PREFIXES:
        if p + ANCHOR in raw:
            return p
    keys = sorted(raw)
    lora = [k for k in keys if "lora_" in k or k.endswith(".alpha")]
    if lora:  # say what was found: a LoRA where a base model belongs
        found = (f"it holds {len(keys)} tensors, {len(lora)} of them LoRA factors (e.g. {lora[:2]}): a LoRA, not a "
                 f"base model; load a base model here and pass the LoRA separately (lora= / --lora)")
    else:
        found = f"it holds {len(keys)} tensors, e.g. {keys[:3]}" if keys else "it holds no tensors"
    raise CheckpointError(f"{source.description}: no {ANCHOR!r} (with or without a 'diffusion_model.' / "
                          f"'transformer.' prefix): not a Qwen-Image transformer checkpoint; {found}")


def resolve_config(path: str, config: Any) -> tuple[DiTConfig, str]:
    """Config from an argument (DiTConfig, config.json path, preset name) or from config.json beside the weights."""
    if isinstance(config, DiTConfig):
        return config, "argument"
    if isinstance(config, (str, os.PathLike)):
        c = os.fspath(config)
        if c in PRESETS:
            return PRESETS[c], f"preset {c!r}"
        if not os.path.exists(c):
            raise CheckpointError(f"--config {c}: neither a config.json file nor a preset name "
                                  f"({', '.join(sorted(PRESETS))})")
        try:
            return DiTConfig.from_json(c), c
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json beside the weights. {ZERO_COND_T_NOTE}")
    try:
        return DiTConfig.from_json(cfg_path), cfg_path
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def open_torch_source(path: str) -> tuple[Any, Detected]:
    """Open a PyTorch-layout base checkpoint: prefix stripped, merged QKV split; with what was detected."""
    source = TensorSource.open(path)
    prefix = find_prefix(source)
    outside = [k for k in source.raw_keys() if not k.startswith(prefix)]
    if outside:
        raise CheckpointError(f"{source.description}: {len(outside)} unexpected tensors outside the "
                              f"'{prefix}' prefix, e.g. {outside[:3]}")
    source.strip_prefix = prefix
    fused = any(_FUSED_KEY.match(k) for k in source.keys())
    style = ("original merged-QKV PyTorch layout (attn.to_qkv / attn.add_qkv_proj)" if fused
             else "diffusers/DiffSynth key names")
    if prefix:
        style += f", prefix {prefix!r} (ComfyUI)" if "diffusion_model" in prefix else f", prefix {prefix!r}"
    det = Detected(path, "base", _container(path, source), style, prefix, fused)
    return (FusedQKVSource(source) if fused else source), det
