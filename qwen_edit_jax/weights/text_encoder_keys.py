"""The one key map of the Qwen2.5-VL encoder: transformers checkpoint names ⇄ Flax parameter paths.

Two checkpoint layouts name the same tensors:

- `transformers5`: `model.language_model.*`, `model.visual.*` (what transformers ≥ 5 saves);
- `legacy`: `model.*` for the language model and `visual.*` (transformers 4.x, the released
  Qwen2.5-VL and Qwen-Image `text_encoder/` folders).

`lm_head.weight` is ignored (the encoder returns hidden states). Every Flax leaf maps to one
checkpoint tensor per layer (stacked leaves: `layers` / `blocks` with a leading layer axis) with a
layout transform:

- `copy`: norms, biases, the embedding table;
- `linear`: torch weight `[out, in]` → kernel `[in, out]`;
- `qkv`: vision fused weight `[3D, D]` → kernel `[D, 3, D]`, bias `[3D]` → `[3, D]`;
- `patch`: Conv3d weight `[D, C, T, P, P]` → kernel `[C·T·P·P, D]` (the conv is a matmul on
  flattened patches).

`read_leaf` reads any slice of a Flax leaf from a tensor source (`keys`, `shape`, `read_slice`),
touching only the layers and rows/columns the slice covers, so sharded loading never holds more
than a device's shard. This module knows names and layouts only; it never imports the models.
The config is duck-typed (`text_config` / `vision_config` attributes as in the model config).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Literal, Sequence

import numpy as np

Transform = Literal["copy", "linear", "qkv", "patch"]
LAYOUTS = {
    "transformers5": {"text": "model.language_model.", "vision": "model.visual."},
    "legacy": {"text": "model.", "vision": "visual."},
}
IGNORED = ("lm_head.weight",)


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One Flax leaf ⇄ one checkpoint tensor (per layer when `layers` > 0)."""

    flax: str  # dotted Flax path, e.g. "language_model.layers.self_attn.q_proj.kernel"
    name: str  # checkpoint name after the tower prefix; "{i}" = layer index
    tower: Literal["text", "vision"]
    transform: Transform = "copy"
    layers: int = 0  # number of stacked layers (0: not stacked)

    def checkpoint_name(self, layout: str, layer: int | None = None) -> str:
        name = self.name.format(i=layer) if self.layers else self.name
        return LAYOUTS[layout][self.tower] + name


def entries(config: Any) -> list[KeyEntry]:
    """All leaves of the encoder for `config` (a `Qwen25VLConfig`)."""
    t, v = config.text_config, config.vision_config
    nt, nv = t.num_hidden_layers, v.depth
    out = [KeyEntry("language_model.embed_tokens.embedding", "embed_tokens.weight", "text"),
           KeyEntry("language_model.norm.weight", "norm.weight", "text")]
    for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        out.append(KeyEntry(f"language_model.layers.{mod}.kernel", f"layers.{{i}}.{mod}.weight", "text", "linear", nt))
        if mod.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            out.append(KeyEntry(f"language_model.layers.{mod}.bias", f"layers.{{i}}.{mod}.bias", "text", "copy", nt))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out.append(KeyEntry(f"language_model.layers.{norm}.weight", f"layers.{{i}}.{norm}.weight", "text", "copy", nt))
    out.append(KeyEntry("visual.patch_embed.proj.kernel", "patch_embed.proj.weight", "vision", "patch"))
    out.append(KeyEntry("visual.blocks.attn.qkv.kernel", "blocks.{i}.attn.qkv.weight", "vision", "qkv", nv))
    out.append(KeyEntry("visual.blocks.attn.qkv.bias", "blocks.{i}.attn.qkv.bias", "vision", "qkv", nv))
    for mod in ("attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        out.append(KeyEntry(f"visual.blocks.{mod}.kernel", f"blocks.{{i}}.{mod}.weight", "vision", "linear", nv))
        out.append(KeyEntry(f"visual.blocks.{mod}.bias", f"blocks.{{i}}.{mod}.bias", "vision", "copy", nv))
    for norm in ("norm1", "norm2"):
        out.append(KeyEntry(f"visual.blocks.{norm}.weight", f"blocks.{{i}}.{norm}.weight", "vision", "copy", nv))
    out.append(KeyEntry("visual.merger.ln_q.weight", "merger.ln_q.weight", "vision"))
    for flax_name, torch_name in (("mlp_0", "mlp.0"), ("mlp_2", "mlp.2")):
        out.append(KeyEntry(f"visual.merger.{flax_name}.kernel", f"merger.{torch_name}.weight", "vision", "linear"))
        out.append(KeyEntry(f"visual.merger.{flax_name}.bias", f"merger.{torch_name}.bias", "vision"))
    return out


def checkpoint_shapes(config: Any, layout: str) -> dict[str, tuple[int, ...]]:
    """Every expected checkpoint tensor name → its torch shape."""
    t, v = config.text_config, config.vision_config
    d, hd, kv = t.hidden_size, t.hidden_size // t.num_attention_heads, t.num_key_value_heads
    dv, wide = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    shapes = {
        "embed_tokens.weight": (t.vocab_size, d), "norm.weight": (d,),
        "self_attn.q_proj.weight": (d, d), "self_attn.q_proj.bias": (d,),
        "self_attn.k_proj.weight": (kv * hd, d), "self_attn.k_proj.bias": (kv * hd,),
        "self_attn.v_proj.weight": (kv * hd, d), "self_attn.v_proj.bias": (kv * hd,),
        "self_attn.o_proj.weight": (d, d),
        "mlp.gate_proj.weight": (t.intermediate_size, d), "mlp.up_proj.weight": (t.intermediate_size, d),
        "mlp.down_proj.weight": (d, t.intermediate_size),
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
    }
    vshapes = {
        "patch_embed.proj.weight": (dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        "attn.qkv.weight": (3 * dv, dv), "attn.qkv.bias": (3 * dv,), "attn.proj.weight": (dv, dv),
        "attn.proj.bias": (dv,), "mlp.gate_proj.weight": (v.intermediate_size, dv),
        "mlp.gate_proj.bias": (v.intermediate_size,), "mlp.up_proj.weight": (v.intermediate_size, dv),
        "mlp.up_proj.bias": (v.intermediate_size,), "mlp.down_proj.weight": (dv, v.intermediate_size),
        "mlp.down_proj.bias": (dv,), "norm1.weight": (dv,), "norm2.weight": (dv,),
        "merger.ln_q.weight": (dv,), "merger.mlp.0.weight": (wide, wide), "merger.mlp.0.bias": (wide,),
        "merger.mlp.2.weight": (v.out_hidden_size, wide), "merger.mlp.2.bias": (v.out_hidden_size,),
    }
    out = {}
    for e in entries(config):
        suffix = e.name.split("}.", 1)[1] if e.layers else e.name
        shape = (shapes if e.tower == "text" else vshapes)[suffix]
        for layer in range(e.layers) if e.layers else [None]:
            out[e.checkpoint_name(layout, layer)] = shape
    return out


def detect_layout(keys: Iterable[str]) -> str:
    """'transformers5' or 'legacy' from the tensor names; ValueError if neither fits."""
    keys = list(keys)
    if any(k.startswith("model.language_model.") or k.startswith("model.visual.") for k in keys):
        return "transformers5"
    if any(k.startswith("visual.") or k.startswith("model.layers.") or k == "model.embed_tokens.weight"
           for k in keys):
        return "legacy"
    raise ValueError(f"no Qwen2.5-VL tensor names found (e.g. {keys[:3]}); expected 'model.language_model.*' / "
                     f"'model.visual.*' or 'model.*' / 'visual.*'")


def flax_shape(entry: KeyEntry, torch_shape: Sequence[int]) -> tuple[int, ...]:
    """The Flax leaf shape for a checkpoint tensor of `torch_shape` (per layer), stacked if needed."""
    s = tuple(torch_shape)
    inner = {"copy": s, "linear": s[::-1], "patch": (int(np.prod(s[1:])), s[0]),
             "qkv": (s[1], 3, s[0] // 3) if len(s) == 2 else (3, s[0] // 3)}[entry.transform]
    return ((entry.layers,) if entry.layers else ()) + inner


def _slices(index: Sequence[slice] | None, shape: Sequence[int]) -> tuple[slice, ...]:
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(tuple(index or ())))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"only contiguous slices are supported, got {s}")
        out.append(slice(start, stop))
    return tuple(out)


def _read_one(source: Any, name: str, transform: Transform, inner: tuple[slice, ...], torch_shape) -> np.ndarray:
    """One layer's slice (Flax layout) of checkpoint tensor `name`."""
    if transform == "copy":
        return source.read_slice(name, inner)
    if transform == "linear":  # kernel[i, o] = W[o, i]
        return source.read_slice(name, (inner[1], inner[0])).T
    if transform == "patch":  # kernel[r, o] = W.reshape(O, -1)[o, r]
        rows = source.read_slice(name, (inner[1],))
        return rows.reshape(rows.shape[0], -1)[:, inner[0]].T
    d = torch_shape[0] // 3  # qkv: kernel[i, g, o] = W[g·D + o, i]; bias[g, o] = b[g·D + o]
    kernel = len(torch_shape) == 2
    groups, cols = (inner[1], inner[2]) if kernel else (inner[0], inner[1])
    parts = []
    for g in range(groups.start, groups.stop):
        rows = slice(g * d + cols.start, g * d + cols.stop)
        parts.append(source.read_slice(name, (rows, inner[0])).T if kernel else source.read_slice(name, (rows,)))
    return np.stack(parts, axis=1 if kernel else 0)


def read_leaf(source: Any, entry: KeyEntry, layout: str, index: Sequence[slice] | None = None,
              dtype: Any = None) -> np.ndarray:
    """`leaf[index]` in Flax layout, read from `source` (checkpoint names), cast to `dtype`.

    Stacked leaves are written layer by layer into one preallocated array, so the checkpoint is
    never held twice.
    """
    first = entry.checkpoint_name(layout, 0 if entry.layers else None)
    torch_shape = tuple(source.shape(first))
    idx = _slices(index, flax_shape(entry, torch_shape))
    layers, inner = (range(idx[0].start, idx[0].stop), idx[1:]) if entry.layers else ([None], idx)
    out_shape = tuple(s.stop - s.start for s in idx)
    out = None
    for j, layer in enumerate(layers):
        part = _read_one(source, entry.checkpoint_name(layout, layer), entry.transform, inner, torch_shape)
        if out is None:
            out = np.empty(out_shape, dtype or part.dtype)
        if entry.layers:
            out[j] = part
        else:
            out[...] = part
    return out if out is not None else np.empty(out_shape, dtype or np.float32)


def to_checkpoint(config: Any, flat_params: dict[str, np.ndarray],
                  layout: str = "transformers5") -> dict[str, np.ndarray]:
    """The inverse map: Flax leaves (dotted path → array) → checkpoint tensors (for export and tests)."""
    out = {}
    for e in entries(config):
        value = np.asarray(flat_params[e.flax])
        for layer in range(e.layers) if e.layers else [None]:
            x = value[layer] if e.layers else value
            if e.transform == "linear":
                x = x.T
            elif e.transform == "patch":
                v = config.vision_config
                x = x.T.reshape(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
            elif e.transform == "qkv":
                x = x.transpose(1, 2, 0).reshape(-1, x.shape[0]) if x.ndim == 3 else x.reshape(-1)
            out[e.checkpoint_name(layout, layer)] = np.ascontiguousarray(x)
    return out
