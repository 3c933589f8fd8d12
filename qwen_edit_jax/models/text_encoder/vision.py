"""The Qwen2.5-VL vision tower (`Qwen2_5_VisionTransformerPretrainedModel`) in Flax NNX.

pixel_values `[N, C·T·P·P]` (all images' patches, processor order: grouped per 2×2 merge cell)
→ patch embedding (the Conv3d with kernel = stride is one matmul) → tokens re-ordered into
windows → `depth` blocks (RMSNorm, attention with 2D RoPE, RMSNorm, SwiGLU with bias) →
PatchMerger (RMSNorm, 2×2 cells concatenated, Linear–GELU–Linear) → raster order again:
`[N/4, out_hidden_size]`.

Attention: window blocks attend within each window (`cu_window_seqlens`), the blocks in
`fullatt_block_indexes` within each image frame (`cu_seqlens`). Both are block-diagonal over
contiguous stretches of the window-ordered sequence, so each is computed as ordinary attention
over the stretches gathered into a padded batch `[G, S]` with a key mask (edge windows are
smaller than the rest): any of the project's attention kernels applies, and nothing of size N² is
formed. The blocks are scanned; a per-layer flag picks the grouping with `lax.cond`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..kernels import get_attention
from .config import EncoderOptions, VisionConfig
from .layers import F32, MLP, Linear, RMSNorm, activation, apply_rope, scan_layers, stack_layers
from .positions import Groups, VisionLayout

EPS = 1e-6  # the vision RMSNorms are built with eps 1e-6 whatever the config says


def vision_rope(rot_pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D RoPE cos/sin `[N, head_dim]` (fp32): frequencies over head_dim/4 pairs for the row, the
    same for the column, concatenated (h | w), then repeated for the rotate-half layout."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=F32) / spatial))
    freqs = rot_pos.astype(F32)[..., None] * inv_freq  # [N, 2, head_dim/4]
    freqs = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, groups: Groups, kernel) -> jax.Array:
    """Attention restricted to each group: gather `[N, H, d]` → `[G, S, H, d]`, attend with the
    key mask `groups.valid`, scatter back to `[N, H, d]`."""
    g, s = groups.gather.shape
    out = kernel(q[groups.gather], k[groups.gather], v[groups.gather], groups.valid)
    return out.reshape(g * s, *out.shape[2:])[groups.scatter]


class PatchEmbed(nnx.Module):
    """`patch_embed.proj` (Conv3d, kernel = stride = (T, P, P), no bias) as a matmul on flat patches."""

    def __init__(self, cfg: VisionConfig, options: EncoderOptions, *, rngs: nnx.Rngs):
        # stays float when quantized: 0.02% of the weights, and it multiplies the raw pixels
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, axes=(None, "embed"), bias=False, options=options,
                           rngs=rngs, quantizable=False)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.proj(pixel_values)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, options: EncoderOptions, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention = options.attention
        self.qkv = Linear(d, (3, d), axes=("embed", None, "heads"), options=options, rngs=rngs)
        self.proj = Linear(d, d, axes=("heads", "embed"), options=options, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: VisionLayout,
                 is_full: jax.Array) -> jax.Array:
        n, d = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        kernel = get_attention(self.attention)
        out = jax.lax.cond(is_full, lambda: grouped_attention(q, k, v, layout.full, kernel),
                           lambda: grouped_attention(q, k, v, layout.windows, kernel))
        return self.proj(out.reshape(n, d))


class VisionBlock(nnx.Module):
    """`Qwen2_5_VLVisionBlock`: pre-norm attention and SwiGLU MLP (with biases), both residual."""

    def __init__(self, cfg: VisionConfig, options: EncoderOptions, *, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=EPS, options=options, rngs=rngs)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=EPS, options=options, rngs=rngs)
        self.attn = VisionAttention(cfg, options, rngs=rngs)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True, options=options, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: VisionLayout,
                 is_full: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, layout, is_full)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """`merger`: RMSNorm, then each merge cell's m² tokens concatenated → `mlp.0` → GELU → `mlp.2`."""

    def __init__(self, cfg: VisionConfig, options: EncoderOptions, *, rngs: nnx.Rngs):
        wide = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, eps=EPS, options=options, rngs=rngs)
        self.mlp_0 = Linear(wide, wide, axes=("embed", "mlp"), options=options, rngs=rngs)
        self.mlp_2 = Linear(wide, cfg.out_hidden_size, axes=("mlp", "embed"), options=options, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x)
        x = x.reshape(-1, self.mlp_0.kernel.shape[0])
        return self.mlp_2(activation("gelu")(self.mlp_0(x)))


class VisionTransformer(nnx.Module):
    """`model.visual`: `(pixel_values [N, patch_dim], layout) → image features [N/4, out_hidden_size]`."""

    def __init__(self, cfg: VisionConfig, options: EncoderOptions, *, rngs: nnx.Rngs):
        self.config, self.options = cfg, options
        self.patch_embed = PatchEmbed(cfg, options, rngs=rngs)
        self.blocks = stack_layers(cfg.depth, lambda r: VisionBlock(cfg, options, rngs=r), rngs)
        self.merger = PatchMerger(cfg, options, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        cfg = self.config
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be [N, {cfg.patch_dim}]; got {tuple(pixel_values.shape)}")
        n = pixel_values.shape[0]
        if n != layout.rot_pos.shape[0]:
            raise ValueError(f"pixel_values has {n} patches, image_grid_thw describes {layout.rot_pos.shape[0]}")
        x = self.patch_embed(pixel_values)
        unit = cfg.merge_unit
        x = x.reshape(n // unit, unit, -1)[layout.window_index].reshape(n, -1)
        cos, sin = vision_rope(layout.rot_pos, cfg.head_dim, cfg.rope_theta)
        is_full = jnp.asarray(np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes))

        def body(block: VisionBlock, h: jax.Array, full: jax.Array) -> jax.Array:
            return block(h, cos, sin, layout, full)

        x = scan_layers(self.blocks, body, x, is_full, remat=self.options.remat)
        return self.merger(x)[layout.reverse_index]
