"""Joint image/text attention: fused projections, QK-norm, RoPE, then a kernel from `models.kernels` by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ...config import ModelOptions
from ..kernels import get_attention
from .layers import Linear, RMSNorm
from .rope import apply_rope


class Attention(nnx.Module):
    """diffusers `attn` of a block, with one fused QKV projection per stream.

    `to_qkv` (image) and `add_qkv_proj` (text) have kernels `[D, 3, D]`: slice 0/1/2 = q/k/v, each
    `[heads·head_dim]` with heads outermost (diffusers' `unflatten(-1, (-1, head_dim))`).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, options: ModelOptions, rngs: nnx.Rngs,
                 layer: jax.Array | None = None):
        self.heads, self.head_dim = heads, head_dim
        self.fuse_qkv = options.fuse_qkv
        self.kernel_name = options.attention  # a name in models.kernels
        lin = dict(options=options, rngs=rngs)
        if self.fuse_qkv:
            qkv = dict(axes=("embed", "qkv", "heads"), layer=layer, **lin)
            self.to_qkv = Linear(dim, (3, dim), name="to_qkv", **qkv)
            self.add_qkv_proj = Linear(dim, (3, dim), name="add_qkv_proj", **qkv)
        else:  # benchmark baseline: six separate projections, as in diffusers
            for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                setattr(self, n, Linear(dim, dim, axes=("embed", "heads"), **lin))
        self.norm_q = RMSNorm(head_dim, options=options)
        self.norm_k = RMSNorm(head_dim, options=options)
        self.norm_added_q = RMSNorm(head_dim, options=options)
        self.norm_added_k = RMSNorm(head_dim, options=options)
        self.to_out = Linear(dim, dim, axes=("heads", "embed"), name="to_out", layer=layer, **lin)
        self.to_add_out = Linear(dim, dim, axes=("heads", "embed"), name="to_add_out", layer=layer, **lin)

    def _project(self, x: jax.Array, stream: str) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.fuse_qkv:
            qkv = (self.to_qkv if stream == "img" else self.add_qkv_proj)(x)  # [B, S, 3, D]
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        else:
            names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
            q, k, v = (getattr(self, n)(x) for n in names)
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)  # noqa: E731
        return split(q), split(k), split(v)

    def __call__(
        self,
        img: jax.Array,
        txt: jax.Array,
        img_rope: tuple[jax.Array, jax.Array],
        txt_rope: tuple[jax.Array, jax.Array],
        txt_mask: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        iq, ik, iv = self._project(img, "img")
        tq, tk, tv = self._project(txt, "txt")
        iq, ik = apply_rope(self.norm_q(iq), *img_rope), apply_rope(self.norm_k(ik), *img_rope)
        tq, tk = apply_rope(self.norm_added_q(tq), *txt_rope), apply_rope(self.norm_added_k(tk), *txt_rope)
        # Joint sequence in diffusers' order [text, image]; only text keys can be masked.
        q = jnp.concatenate([tq, iq], axis=1)
        k = jnp.concatenate([tk, ik], axis=1)
        v = jnp.concatenate([tv, iv], axis=1)
        key_mask = None
        if txt_mask is not None:
            key_mask = jnp.concatenate([txt_mask, jnp.ones(img.shape[:2], bool)], axis=1)
        out = get_attention(self.kernel_name)(q, k, v, key_mask)
        out = out.reshape(*out.shape[:2], -1)
        n_txt = txt.shape[1]
        return self.to_out(out[:, n_txt:]), self.to_add_out(out[:, :n_txt])
