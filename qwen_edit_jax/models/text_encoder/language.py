"""The Qwen2.5-VL language model (`Qwen2_5_VLTextModel`) in Flax NNX, forward only, no KV cache.

inputs_embeds `[B, L, D]` + M-RoPE position ids `[3, B, L]` + attention mask `[B, L]` →
`num_hidden_layers` decoder layers (RMSNorm, GQA with q/k/v bias and M-RoPE, RMSNorm, SwiGLU),
scanned → final RMSNorm. The result is transformers' `last_hidden_state` (= `hidden_states[-1]`,
what the Qwen-Image pipelines use).

Attention here is causal, which the project's kernels (`models.kernels`, key mask only) cannot
express; `causal_attention` is a plain-XLA SDPA with a causal ∧ key mask that contracts the GQA
groups without repeating k/v. It materialises `[B, H, L, L]` fp32 scores (≈ 250 MB per sample
for the 7B model at L = 1.5k).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...parallel import constrain
from .config import EncoderOptions, TextConfig
from .layers import F32, MLP, Linear, RMSNorm, _normal, apply_rope, scan_layers, stack_layers


def mrope_cos_sin(position_ids: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """M-RoPE cos/sin `[B, L, head_dim]` in `dtype`: the head_dim/2 frequency pairs are split into
    `mrope_section` chunks; chunk i takes its angle from the t, h or w positions (i mod 3)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=F32) / hd))
    freqs = position_ids.astype(F32)[..., None] * inv_freq  # [3, B, L, hd/2]
    axis = np.repeat(np.arange(len(cfg.mrope_section)) % 3, cfg.mrope_section)  # [hd/2] ∈ {0, 1, 2}
    freqs = jnp.take_along_axis(freqs, jnp.asarray(axis)[None, None, None, :], axis=0)[0]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    """Causal SDPA (scale 1/√d, fp32 scores and softmax) with grouped k/v heads.

    q `[B, L, H, d]`, k/v `[B, L, KV, d]` (query head h uses k/v head h // (H/KV), as
    transformers' `repeat_kv`), key_mask `[B, L]` bool or None. Rows with no visible key (left
    padding) give finite garbage, never NaN.
    """
    b, n, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, n, kv, h // kv, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=F32) / math.sqrt(d)
    mask = jnp.tril(jnp.ones((n, n), bool))[None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, :].astype(bool)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(F32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=F32)
    return out.reshape(b, n, h, d).astype(q.dtype)


class Attention(nnx.Module):
    """`self_attn`: q/k/v projections with bias, o_proj without."""

    def __init__(self, cfg: TextConfig, options: EncoderOptions, *, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        kw = dict(options=options, rngs=rngs)
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, axes=("embed", "heads"), **kw)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, axes=("heads", "embed"), bias=False, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        b, n, _ = x.shape
        q = self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos[:, :, None], sin[:, :, None]), apply_rope(k, cos[:, :, None], sin[:, :, None])
        out = causal_attention(q, k, v, key_mask)
        return self.o_proj(out.reshape(b, n, -1))


class DecoderLayer(nnx.Module):
    """`Qwen2_5_VLDecoderLayer`: pre-norm attention and SwiGLU MLP, both residual."""

    def __init__(self, cfg: TextConfig, options: EncoderOptions, *, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs)
        self.self_attn = Attention(cfg, options, rngs=rngs)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", None))


class Embedding(nnx.Module):
    """`embed_tokens`: table `[vocab, D]`, rows looked up."""

    def __init__(self, vocab: int, dim: int, *, options: EncoderOptions, rngs: nnx.Rngs):
        self.dtype = options.dtype
        self.embedding = nnx.Param(_normal(rngs, (vocab, dim), 1.0, options.param_dtype), out_sharding=(None, "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class TextModel(nnx.Module):
    """`model.language_model`: `(inputs_embeds, position_ids, attention_mask) → last_hidden_state`."""

    def __init__(self, cfg: TextConfig, options: EncoderOptions, *, rngs: nnx.Rngs):
        self.config, self.options = cfg, options
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, options=options, rngs=rngs)
        self.layers = stack_layers(cfg.num_hidden_layers, lambda r: DecoderLayer(cfg, options, rngs=r), rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, options=options, rngs=rngs)

    def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        x = constrain(inputs_embeds.astype(self.options.dtype), ("batch", "seq", None))
        cos, sin = mrope_cos_sin(position_ids, self.config, x.dtype)
        key_mask = None if attention_mask is None else attention_mask.astype(bool)

        def body(layer: DecoderLayer, h: jax.Array, _) -> jax.Array:
            return layer(h, cos, sin, key_mask)

        x = scan_layers(self.layers, body, x, remat=self.options.remat)
        return self.norm(x)
