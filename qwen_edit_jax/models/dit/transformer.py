"""`QwenImageTransformer`: the Qwen-Image double-stream MMDiT with merged QKV, in Flax NNX.

Mirrors diffusers `QwenImageTransformer2DModel` module for module (names included); the 60
identical blocks are stored stacked (leading `layers` axis) and run with `jax.lax.scan`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...config import DiTConfig, ModelOptions
from ...parallel import constrain_tokens
from ..offload import offloaded_scan
from .attention import Attention
from .layers import MATMUL_CHECKPOINT_NAME, FeedForward, Linear, RMSNorm, TimeTextEmbed, layer_norm, modulate
from .rope import ImgShape, rope_angles, rotations


class BlockContext(NamedTuple):
    """Per-call inputs shared by every block (a pytree: closed over by the scan body, or an argument of
    the offloaded scan)."""

    temb: jax.Array  # [B, D]
    temb_ref: jax.Array | None  # [B, D], temb(σ=0) for reference tokens (zero_cond_t)
    ref_mask: jax.Array | None  # [N] bool, True for reference-image tokens (zero_cond_t)
    img_rope: tuple[jax.Array, jax.Array]  # (cos, sin) of the RoPE angles, [N, d/2] each
    txt_rope: tuple[jax.Array, jax.Array]  # [L, d/2] each
    txt_mask: jax.Array | None  # [B, L] bool


class Modulation(NamedTuple):
    """The six adaLN chunks of a block, each `[R, 1, D]` (or `[B, N, D]` per token under zero_cond_t):
    shift/scale/gate before attention (msa) and before the MLP (mlp), in diffusers' order."""

    shift_msa: jax.Array
    scale_msa: jax.Array
    gate_msa: jax.Array
    shift_mlp: jax.Array
    scale_mlp: jax.Array
    gate_mlp: jax.Array


def _modulation(mod: jax.Array) -> Modulation:
    """[R, 6D] → the six [R, 1, D] chunks."""
    return Modulation(*(c[:, None, :] for c in jnp.split(mod, 6, axis=-1)))


class Block(nnx.Module):
    """One `transformer_blocks[i]` (diffusers `QwenImageTransformerBlock`)."""

    def __init__(self, cfg: DiTConfig, options: ModelOptions, *, rngs: nnx.Rngs, layer: jax.Array | None = None):
        d = cfg.inner_dim
        lin = dict(options=options, rngs=rngs, layer=layer)  # layer: this block's index (per-layer adapter plans)
        self.img_mod = Linear(d, 6 * d, axes=("embed", "mod"), name="img_mod", **lin)
        self.txt_mod = Linear(d, 6 * d, axes=("embed", "mod"), name="txt_mod", **lin)
        self.attn = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim, **lin)
        self.img_mlp = FeedForward(d, name="img_mlp", **lin)
        self.txt_mlp = FeedForward(d, name="txt_mlp", **lin)

    def __call__(self, img: jax.Array, txt: jax.Array, c: BlockContext) -> tuple[jax.Array, jax.Array]:
        img, txt = constrain_tokens(img), constrain_tokens(txt)
        if c.temb_ref is None:
            im = _modulation(self.img_mod(jax.nn.silu(c.temb)))
        else:  # zero_cond_t: reference tokens take shift, scale and gate from temb(0)
            both = self.img_mod(jax.nn.silu(jnp.concatenate([c.temb, c.temb_ref], axis=0)))
            cur, ref = jnp.split(both, 2, axis=0)
            sel = c.ref_mask[None, :, None]
            im = Modulation(*(jnp.where(sel, r, m) for m, r in zip(_modulation(cur), _modulation(ref))))
        tm = _modulation(self.txt_mod(jax.nn.silu(c.temb)))

        a_img, a_txt = self.attn(
            modulate(layer_norm(img), im.shift_msa, im.scale_msa),
            modulate(layer_norm(txt), tm.shift_msa, tm.scale_msa),
            c.img_rope,
            c.txt_rope,
            c.txt_mask,
        )
        img = img + im.gate_msa * a_img
        txt = txt + tm.gate_msa * a_txt
        img = img + im.gate_mlp * self.img_mlp(modulate(layer_norm(img), im.shift_mlp, im.scale_mlp))
        txt = txt + tm.gate_mlp * self.txt_mlp(modulate(layer_norm(txt), tm.shift_mlp, tm.scale_mlp))
        return constrain_tokens(img), constrain_tokens(txt)


class NormOut(nnx.Module):
    """`norm_out` (AdaLayerNormContinuous): note the (scale, shift) order, unlike the blocks."""

    def __init__(self, d: int, *, options: ModelOptions, rngs: nnx.Rngs):
        self.linear = Linear(d, 2 * d, axes=("embed", "mod"), options=options, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(jax.nn.silu(temb)), 2, axis=-1)
        return modulate(layer_norm(x), shift[:, None, :], scale[:, None, :])


def remat_policy(name: str):
    return {
        "full": None,
        "save_matmuls": jax.checkpoint_policies.save_only_these_names(MATMUL_CHECKPOINT_NAME),
    }[name]


def normalize_img_shapes(img_shapes: Any, batch: int | None, n_tokens: int) -> tuple[ImgShape, ...]:
    """Accept one list of (frames, h, w) or one per sample; all samples must share it.

    `batch`: the number of per-sample lists expected (None: any number).
    """
    if not img_shapes:
        raise ValueError("img_shapes is required: one list of (frames, h, w) per sample")
    first = img_shapes[0]
    per_sample = isinstance(first, (list, tuple)) and len(first) > 0 and isinstance(first[0], (list, tuple))
    samples = [tuple(tuple(int(v) for v in s) for s in sample) for sample in img_shapes] if per_sample else None
    layout = samples[0] if per_sample else tuple(tuple(int(v) for v in s) for s in img_shapes)
    if per_sample:
        if batch is not None and len(samples) != batch:
            raise ValueError(f"img_shapes has {len(samples)} samples but the batch has {batch}")
        if any(s != layout for s in samples):
            raise ValueError(f"all samples in a batch must share one image layout; got {samples}")
    if any(len(s) != 3 or min(s) <= 0 for s in layout):
        raise ValueError(f"img_shapes entries must be positive (frames, h, w) triples; got {layout}")
    total = sum(f * h * w for f, h, w in layout)
    if total != n_tokens:
        raise ValueError(f"img_shapes {list(layout)} describe {total} tokens but hidden_states has {n_tokens}")
    return layout


class QwenImageTransformer(nnx.Module):
    """Qwen-Image(-Edit) DiT. Call like diffusers' model; returns `[B, N_image_tokens, 4·out_channels]`."""

    def __init__(self, config: DiTConfig, options: ModelOptions | None = None, *, rngs: nnx.Rngs | None = None):
        options = options or ModelOptions()
        rngs = rngs or nnx.Rngs(0)
        self.config, self.options = config, options
        d = config.inner_dim
        lin = dict(options=options, rngs=rngs)
        self.time_text_embed = TimeTextEmbed(d, **lin)
        self.txt_norm = RMSNorm(config.joint_attention_dim, options=options)
        self.img_in = Linear(config.in_channels, d, axes=(None, "embed"), **lin)
        self.txt_in = Linear(config.joint_attention_dim, d, axes=(None, "embed"), **lin)

        if options.lora is not None and options.lora.has_patterns:
            plan_layers = {len(ranks) for _, ranks, _ in options.lora.plan or ()}
            if options.lora.plan is None or plan_layers - {config.num_layers}:
                raise ValueError(f"the LoRA plan has {sorted(plan_layers) or 'no'} layers, the model "
                                 f"{config.num_layers}: resolve it with qwen_edit_jax.lora.resolve_lora_config")

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r: nnx.Rngs, layer: jax.Array) -> Block:
            return Block(config, options, rngs=r, layer=layer)

        self.transformer_blocks = make_blocks(rngs, jnp.arange(config.num_layers))
        self.norm_out = NormOut(d, **lin)
        self.proj_out = Linear(d, config.out_features, axes=("embed", None), **lin)

    def _run_blocks(self, img: jax.Array, txt: jax.Array, ctx: BlockContext) -> tuple[jax.Array, jax.Array]:
        opts = self.options
        if opts.offload == "base":  # frozen base on the host, fetched per layer; LoRA stays on the device
            graphdef, lora, base = nnx.split(self.transformer_blocks, nnx.LoRAParam, ...)
            return offloaded_scan(lambda c, x, w, k: nnx.merge(graphdef, x, w)(*c, k), (img, txt), lora, base, ctx)
        graphdef, state = nnx.split(self.transformer_blocks)

        def body(carry, layer_state):
            out = nnx.merge(graphdef, layer_state)(*carry, ctx)
            return out, None

        if opts.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(opts.remat), prevent_cse=not opts.scan_layers)
        carry = (img, txt)
        if opts.scan_layers:
            carry, _ = jax.lax.scan(body, carry, state)
        else:
            for i in range(self.config.num_layers):
                carry, _ = body(carry, jax.tree.map(lambda x: x[i], state))
        return carry

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        encoder_hidden_states_mask: jax.Array | None = None,
        timestep: jax.Array | float | None = None,
        img_shapes: Sequence[Any] | None = None,
    ) -> jax.Array:
        cfg, dt = self.config, self.options.dtype
        b, n, c_in = hidden_states.shape
        if c_in != cfg.in_channels:
            raise ValueError(f"hidden_states has {c_in} channels, the model expects in_channels={cfg.in_channels}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"encoder_hidden_states must be [B={b}, L, {cfg.joint_attention_dim}], "
                             f"got {tuple(encoder_hidden_states.shape)}")
        if encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != "
                             f"joint_attention_dim {cfg.joint_attention_dim}")
        if timestep is None:
            raise ValueError("timestep (sigma in [0, 1], shape [B]) is required")
        layout = normalize_img_shapes(img_shapes, b, n)
        n_txt = encoder_hidden_states.shape[1]

        img = constrain_tokens(self.img_in(hidden_states))
        sigma = jnp.broadcast_to(jnp.asarray(timestep), (b,)).astype(dt)  # diffusers rounds σ to the activation dtype
        temb = self.time_text_embed(sigma)
        temb_ref = ref_mask = None
        n_target = int(np.prod(layout[0]))
        if cfg.zero_cond_t and n_target < n:
            temb_ref = self.time_text_embed(jnp.zeros_like(sigma))
            ref_mask = jnp.asarray(np.arange(n) >= n_target)
        txt = constrain_tokens(self.txt_in(self.txt_norm(encoder_hidden_states.astype(dt))))
        txt_mask = None
        if encoder_hidden_states_mask is not None:
            if encoder_hidden_states_mask.shape != (b, n_txt):
                raise ValueError(f"encoder_hidden_states_mask shape {tuple(encoder_hidden_states_mask.shape)} "
                                 f"must be (B, L) = ({b}, {n_txt})")
            txt_mask = encoder_hidden_states_mask.astype(bool)
        img_angles, txt_angles = rope_angles(layout, n_txt, cfg.axes_dims_rope)
        img_rope = tuple(jnp.asarray(t) for t in rotations(img_angles))
        txt_rope = tuple(jnp.asarray(t) for t in rotations(txt_angles))
        ctx = BlockContext(temb, temb_ref, ref_mask, img_rope, txt_rope, txt_mask)
        img, _ = self._run_blocks(img, txt, ctx)
        return constrain_tokens(self.proj_out(self.norm_out(img, temb)))


BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def count_params(model: nnx.Module, filter_: Any = BASE_PARAMS) -> int:
    """Number of parameters selected by `filter_` (default: base weights, LoRA excluded)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, filter_)))
