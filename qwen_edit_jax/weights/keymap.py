"""The one key map: diffusers weight names ⇄ Flax parameter paths.

Every reader and writer of weights (loader, converter both ways, LoRA import/export, sharded
loading) goes through this table; no other module knows a diffusers name.

A `ModuleEntry` maps one Flax linear or norm to one torch module, or — for the fused QKV
projections — to three torch modules (q, k, v) stacked on a new axis. Entries under
`transformer_blocks` are stacked over layers (leading axis) and map to
`transformer_blocks.{i}.<torch name>` for each layer i.

Layouts: torch Linear weight `[out, in]` ⇄ Flax kernel `[in, out]`; fused kernel `[in, 3, out]`
(slice j = q, k, v) and fused bias `[3, out]`; RMSNorm `weight` ⇄ `scale`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Literal

import numpy as np

from ..config import DiTConfig
from .arrays import transpose_2d

BLOCKS = "transformer_blocks"


@dataclasses.dataclass(frozen=True)
class ModuleEntry:
    flax: str  # Flax module path, e.g. "transformer_blocks.attn.to_qkv"
    torch: tuple[str, ...]  # torch module name(s); relative to the block when stacked
    kind: Literal["linear", "norm"]
    stacked: bool = False

    @property
    def fused(self) -> bool:
        return len(self.torch) > 1

    def torch_modules(self, layer: int | None = None) -> tuple[str, ...]:
        """Full torch module names (for one layer when stacked)."""
        if not self.stacked:
            return self.torch
        return tuple(f"{BLOCKS}.{layer}.{t}" for t in self.torch)

    def leaves(self) -> tuple[tuple[str, str], ...]:
        """(flax leaf, torch leaf) pairs."""
        return (("kernel", "weight"), ("bias", "bias")) if self.kind == "linear" else (("scale", "weight"),)


def _top() -> list[ModuleEntry]:
    lin = lambda f, t=None: ModuleEntry(f, (t or f,), "linear")  # noqa: E731
    return [
        lin("time_text_embed.timestep_embedder.linear_1"),
        lin("time_text_embed.timestep_embedder.linear_2"),
        ModuleEntry("txt_norm", ("txt_norm",), "norm"),
        lin("img_in"),
        lin("txt_in"),
        lin("norm_out.linear"),
        lin("proj_out"),
    ]


def _block(fuse_qkv: bool) -> list[ModuleEntry]:
    def e(f: str, *t: str, kind: Literal["linear", "norm"] = "linear") -> ModuleEntry:
        return ModuleEntry(f"{BLOCKS}.{f}", t or (f,), kind, stacked=True)

    if fuse_qkv:
        qkv = [e("attn.to_qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
               e("attn.add_qkv_proj", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")]
    else:
        qkv = [e(f"attn.{n}") for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")]
    return [
        e("img_mod", "img_mod.1"),
        e("txt_mod", "txt_mod.1"),
        *qkv,
        *(e(f"attn.{n}", kind="norm") for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")),
        e("attn.to_out", "attn.to_out.0"),
        e("attn.to_add_out"),
        e("img_mlp.fc1", "img_mlp.net.0.proj"),
        e("img_mlp.fc2", "img_mlp.net.2"),
        e("txt_mlp.fc1", "txt_mlp.net.0.proj"),
        e("txt_mlp.fc2", "txt_mlp.net.2"),
    ]


def module_entries(fuse_qkv: bool = True) -> list[ModuleEntry]:
    return _top() + _block(fuse_qkv)


def fused_entries() -> dict[str, ModuleEntry]:
    """Fused module name relative to a block → its entry: {'attn.to_qkv': (to_q, to_k, to_v), 'attn.add_qkv_proj': …}."""
    return {e.flax.split(".", 1)[1]: e for e in module_entries(True) if e.fused}


def torch_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every diffusers parameter name → its torch shape, for this config (1,933 for the real model)."""
    d, j, hd = cfg.inner_dim, cfg.joint_attention_dim, cfg.attention_head_dim
    top = {
        "time_text_embed.timestep_embedder.linear_1": (d, 256),
        "time_text_embed.timestep_embedder.linear_2": (d, d),
        "txt_norm": (j,),
        "img_in": (d, cfg.in_channels),
        "txt_in": (d, j),
        "norm_out.linear": (2 * d, d),
        "proj_out": (cfg.out_features, d),
    }
    block = {"img_mod.1": (6 * d, d), "txt_mod.1": (6 * d, d), "attn.to_out.0": (d, d), "attn.to_add_out": (d, d),
             "img_mlp.net.0.proj": (4 * d, d), "img_mlp.net.2": (d, 4 * d),
             "txt_mlp.net.0.proj": (4 * d, d), "txt_mlp.net.2": (d, 4 * d)}
    block |= {f"attn.{n}": (d, d) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    block |= {f"attn.{n}": (hd,) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
    out: dict[str, tuple[int, ...]] = {}

    def add(name: str, shape: tuple[int, ...]) -> None:
        out[f"{name}.weight"] = shape
        if len(shape) == 2:  # linears carry a bias; RMSNorms do not
            out[f"{name}.bias"] = (shape[0],)

    for name, shape in top.items():
        add(name, shape)
    for i in range(cfg.num_layers):
        for name, shape in block.items():
            add(f"{BLOCKS}.{i}.{name}", shape)
    return out


def flax_leaf_shape(entry: ModuleEntry, leaf: str, cfg: DiTConfig) -> tuple[int, ...]:
    """Shape of a Flax leaf built from the torch shapes of `entry`."""
    shapes = torch_shapes(cfg)
    layer = 0 if entry.stacked else None
    tshape = shapes[f"{entry.torch_modules(layer)[0]}.{'bias' if leaf == 'bias' else 'weight'}"]
    if leaf == "kernel":
        shape: tuple[int, ...] = (tshape[1], len(entry.torch), tshape[0]) if entry.fused else (tshape[1], tshape[0])
    elif leaf == "bias":
        shape = (len(entry.torch), tshape[0]) if entry.fused else tshape
    else:
        shape = tshape
    return ((cfg.num_layers,) if entry.stacked else ()) + shape


def to_flax_leaf(leaf: str, tensors: list[np.ndarray]) -> np.ndarray:
    """torch tensor(s) of one module (one layer) → the Flax leaf value for that layer."""
    if leaf == "kernel":
        mats = [transpose_2d(t) for t in tensors]
        return mats[0] if len(mats) == 1 else np.stack(mats, axis=1)
    return tensors[0] if len(tensors) == 1 else np.stack(tensors, axis=0)


def from_flax_leaf(leaf: str, value: np.ndarray, n_torch: int,
                   outs: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Inverse of `to_flax_leaf` for one layer: Flax leaf → list of torch tensors (contiguous).

    `outs`: one array per torch tensor to write into (cast to its dtype), e.g. reused buffers.
    """
    if leaf == "kernel":
        parts = [value] if n_torch == 1 else [value[:, j] for j in range(n_torch)]
    else:
        parts = [value] if n_torch == 1 else [value[j] for j in range(n_torch)]
    if outs is None:
        return [transpose_2d(p) if leaf == "kernel" else np.ascontiguousarray(p) for p in parts]
    for p, o in zip(parts, outs, strict=True):
        if leaf == "kernel":
            transpose_2d(p, o)
        else:
            o[...] = p
    return outs


def iter_leaves(cfg: DiTConfig, fuse_qkv: bool = True) -> Iterator[tuple[str, ModuleEntry, str, str]]:
    """(flax path, entry, flax leaf, torch leaf) for every Flax parameter."""
    for entry in module_entries(fuse_qkv):
        for fleaf, tleaf in entry.leaves():
            yield f"{entry.flax}.{fleaf}", entry, fleaf, tleaf


def torch_names_for(entry: ModuleEntry, tleaf: str, layer: int | None) -> list[str]:
    return [f"{m}.{tleaf}" for m in entry.torch_modules(layer)]


def find_module(torch_module: str, fuse_qkv: bool = True) -> tuple[ModuleEntry, int | None, int] | None:
    """Map a torch module name (no leaf) → (entry, layer or None, index within a fused group)."""
    layer = None
    rel = torch_module
    if torch_module.startswith(BLOCKS + "."):
        head, _, rest = torch_module[len(BLOCKS) + 1 :].partition(".")
        if not head.isdigit():
            return None
        layer, rel = int(head), rest
    for entry in module_entries(fuse_qkv):
        if entry.stacked != (layer is not None):
            continue
        if rel in entry.torch:
            return entry, layer, entry.torch.index(rel)
    return None
