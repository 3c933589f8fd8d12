"""Edit sampling: flow-match Euler with dynamic shift and true CFG, numerically equal to diffusers.

Mirrors the denoising loop of diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`
(`FlowMatchEulerDiscreteScheduler` with the Qwen-Image scheduler config) in one compiled program:
the whole loop is a `jax.lax.fori_loop` inside `jax.jit`, so there is no per-step Python dispatch.
The conditional and unconditional (negative-prompt) passes run as one batch-2B forward
(`batch_cfg=True`) or one after the other (`False`, half the activation memory); the default
(`None`) picks per platform what measured faster (`default_batch_cfg`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.dit import QwenImageTransformer, normalize_img_shapes
from ..models.kernels.platform import platform_of
from ..parallel import batch_sharding, param_shardings, replicated, sharded_jit
from .schedule import (
    QWEN_IMAGE_SCHEDULER,
    FlowMatchConfig,
    cfg_combine,
    euler_step,
    flow_match_sigmas,
    model_timesteps,
)

F32 = jnp.float32


def _pad_text(embeds: jax.Array, mask: jax.Array | None, length: int) -> tuple[jax.Array, jax.Array]:
    """Right-pad [B, L, D] embeddings with zeros to `length` and return a matching [B, length] bool mask."""
    b, l, _ = embeds.shape
    mask = jnp.ones((b, l), bool) if mask is None else mask.astype(bool)
    pad = length - l
    if pad:
        embeds = jnp.pad(embeds, ((0, 0), (0, pad), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    return embeds, mask


class _Text(NamedTuple):
    """The prompt embeddings `[B, L, D]` and key masks `[B, L]`; the negative ones None without CFG."""

    pos: jax.Array
    pos_mask: jax.Array | None
    neg: jax.Array | None
    neg_mask: jax.Array | None


class _Inputs(NamedTuple):
    """What the batch axes split: initial latents, reference latents, text."""

    latents: jax.Array
    refs: jax.Array | None
    text: _Text


class _Schedule(NamedTuple):
    """Replicated over the mesh: σ per step (with the terminal one), the model timesteps, the CFG scale."""

    sigmas: jax.Array
    timesteps: jax.Array
    cfg_scale: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "mode", "mesh"))
def _denoise(graphdef: nnx.GraphDef, state: nnx.State, inputs: _Inputs, schedule: _Schedule, *,
             layout: tuple, mode: str, mesh: Any = None) -> jax.Array:
    """The compiled loop. `mode`: 'none' (no CFG), 'batched' (cond ‖ uncond in one forward), 'separate'."""
    model = nnx.merge(graphdef, state)
    latents, refs, text = inputs
    b, n_target, _ = latents.shape

    def forward(x: jax.Array, emb: jax.Array, mask: jax.Array | None, t: jax.Array) -> jax.Array:
        return model(hidden_states=x, encoder_hidden_states=emb, encoder_hidden_states_mask=mask,
                     timestep=t, img_shapes=layout)[:, :n_target]

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        inp = x if refs is None else jnp.concatenate([x, refs], axis=1)
        v = _velocity(forward, inp, text, jnp.full((b,), schedule.timesteps[i], F32), schedule.cfg_scale, mode, mesh)
        return euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])

    return jax.lax.fori_loop(0, schedule.timesteps.shape[0], body, latents)


def _velocity(forward: Callable[..., jax.Array], inp: jax.Array, text: _Text, t: jax.Array, cfg_scale: jax.Array,
              mode: str, mesh: Any) -> jax.Array:
    """One step's velocity: the conditional prediction, CFG-combined with the unconditional one unless `mode`
    is 'none'."""
    b = inp.shape[0]
    if mode == "none":
        return forward(inp, text.pos, text.pos_mask, t)
    if mode == "batched":
        both = [None if p[0] is None else _split_batch(jnp.concatenate(p), mesh)
                for p in ((inp, inp), (text.pos, text.neg), (text.pos_mask, text.neg_mask), (t, t))]
        out = forward(*both)
        cond, uncond = out[:b], out[b:]
    else:  # one forward, traced once and run twice in sequence: half the activations, one compile
        masks = None if text.pos_mask is None else jnp.stack((text.pos_mask, text.neg_mask))
        cond, uncond = jax.lax.map(lambda e: forward(inp, e[0], e[1], t), (jnp.stack((text.pos, text.neg)), masks))
    return cfg_combine(cond, uncond, cfg_scale)


def _split_batch(x: jax.Array, mesh: Any) -> jax.Array:
    """The 2B CFG batch: spread cond/uncond over the batch axes when it divides."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.shape[0]))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_latents(model: QwenImageTransformer, noise: jax.Array, image_latents: jax.Array | None) -> int:
    """Packed target and reference latents of matching batch and width; returns the reference token count."""
    _check(noise.ndim == 3, f"noise must be packed latents [B, N_target, C], got shape {tuple(noise.shape)}")
    b, _, c = noise.shape
    _check(c == model.config.in_channels,
           f"noise has {c} features per token, the model expects in_channels={model.config.in_channels}")
    if image_latents is None:
        return 0
    _check(image_latents.ndim == 3 and image_latents.shape[0] == b and image_latents.shape[2] == c,
           f"image_latents must be packed [B={b}, N_ref, {c}], got shape {tuple(image_latents.shape)}")
    return image_latents.shape[1]


def _check_prompt(name: str, embeds: jax.Array, mask: jax.Array | None, b: int, width: int | None = None) -> None:
    """`name` [B, L, D] (D = `width` when given) and its mask [B, L]."""
    ok = embeds.ndim == 3 and embeds.shape[0] == b and (width is None or embeds.shape[2] == width)
    want = f"[B={b}, L, D]" if width is None else f"[B={b}, L_neg, {width}]"
    _check(ok, f"{name} must be {want}, got shape {tuple(embeds.shape)}")
    if mask is not None:
        _check(tuple(mask.shape) == tuple(embeds.shape[:2]),
               f"{name}_mask shape {tuple(mask.shape)} != {tuple(embeds.shape[:2])}")


def _text(pos: jax.Array, pos_mask: jax.Array | None, neg: jax.Array | None, neg_mask: jax.Array | None) -> _Text:
    """Device arrays; with a negative prompt both are zero-padded to the longer one with key masks (both CFG
    modes stack them), unless they are unmasked and equally long."""
    pos, pos_mask = jnp.asarray(pos), None if pos_mask is None else jnp.asarray(pos_mask)
    if neg is None:
        return _Text(pos, pos_mask, None, None)
    neg, neg_mask = jnp.asarray(neg), None if neg_mask is None else jnp.asarray(neg_mask)
    if not (pos_mask is None and neg_mask is None and pos.shape[1] == neg.shape[1]):
        length = max(pos.shape[1], neg.shape[1])
        pos, pos_mask = _pad_text(pos, pos_mask, length)
        neg, neg_mask = _pad_text(neg, neg_mask, length)
    return _Text(pos, pos_mask, neg, neg_mask)


def default_batch_cfg(mesh: Any = None) -> bool:
    """Whether CFG runs batched by default: yes on accelerators (one 2B forward fills the chip), no on
    CPU, where the two B passes measured faster (docs/results.md, sampling speed)."""
    return platform_of(mesh) != "cpu"


def sample(
    model: QwenImageTransformer,
    *,
    noise: jax.Array,
    image_latents: jax.Array | None,
    prompt_embeds: jax.Array,
    prompt_embeds_mask: jax.Array | None,
    negative_prompt_embeds: jax.Array | None = None,
    negative_prompt_embeds_mask: jax.Array | None = None,
    true_cfg_scale: float = 4.0,
    num_inference_steps: int = 50,
    img_shapes: Sequence[Any],
    batch_cfg: bool | None = None,
    scheduler: FlowMatchConfig = QWEN_IMAGE_SCHEDULER,
    mesh: Any = None,
) -> jax.Array:
    """Denoise `noise` into the target's packed latents `[B, N_target, 64]` (dtype of `noise`).

    `noise` [B, N_target, 64] is the initial latent (σ = 1) and its dtype is the latent dtype kept
    between steps (diffusers: the text-encoder dtype, bf16). `image_latents` [B, N_ref, 64] are the
    packed, normalised reference latents (several references concatenated, as Edit-2509/2511 do;
    None for text-to-image); `img_shapes` lists (1, h, w) for the target, then each reference.
    CFG runs when `true_cfg_scale > 1` and a negative prompt is given (as in diffusers). Positive and
    negative prompts may differ in length: for the batched pass both are zero-padded to the longer
    one with key masks, which leaves the result unchanged (both modes do this). `batch_cfg=False` runs
    the two passes one after the other (half the activation memory); None: `default_batch_cfg(mesh)`.
    With `mesh`, the batch is split over the mesh's batch axes (`parallel.batch_sharding`; the doubled
    CFG batch too, so with B = 1 on a data axis of 2 the cond and uncond passes run on different
    devices); place the model first with `parallel.shard_model` or `load_transformer(mesh=)`.
    The keywords mirror diffusers' pipeline call.
    """
    n_ref = _check_latents(model, noise, image_latents)
    b, n_target, _ = noise.shape
    _check_prompt("prompt_embeds", prompt_embeds, prompt_embeds_mask, b)
    layout = normalize_img_shapes(img_shapes, b, n_target + n_ref)
    _check(int(np.prod(layout[0])) == n_target,
           f"img_shapes[0] {layout[0]} describes {int(np.prod(layout[0]))} target tokens but noise has {n_target}")
    has_neg = negative_prompt_embeds is not None
    if true_cfg_scale > 1 and not has_neg:
        warnings.warn(f"true_cfg_scale={true_cfg_scale} but no negative prompt: CFG is off (as in diffusers)",
                      stacklevel=2)
    do_cfg = true_cfg_scale > 1 and has_neg
    if do_cfg:
        _check_prompt("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_embeds_mask, b,
                      width=prompt_embeds.shape[2])
        text = _text(prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask)
        mode = "batched" if (default_batch_cfg(mesh) if batch_cfg is None else batch_cfg) else "separate"
    else:
        text, mode = _text(prompt_embeds, prompt_embeds_mask, None, None), "none"

    latent_dtype = np.dtype(noise.dtype)
    sigmas = flow_match_sigmas(num_inference_steps, n_target, config=scheduler)
    schedule = _Schedule(jnp.asarray(sigmas),
                         jnp.asarray(model_timesteps(sigmas, latent_dtype, scheduler.num_train_timesteps)),
                         jnp.asarray(true_cfg_scale, F32))
    refs = None if image_latents is None else jnp.asarray(image_latents).astype(latent_dtype)
    inputs = _Inputs(jnp.asarray(noise), refs, text)
    graphdef, state = nnx.split(model)
    if mesh is None:
        return _denoise(graphdef, state, inputs, schedule, layout=layout, mode=mode)
    inputs = jax.device_put(inputs, batch_sharding(mesh, b))
    schedule = jax.device_put(schedule, replicated(mesh))
    with jax.set_mesh(mesh):
        return _denoise(graphdef, state, inputs, schedule, layout=layout, mode=mode, mesh=mesh)


def sharded_forward(model: nnx.Module, mesh: Any, img_shapes: Any) -> Callable[..., jax.Array]:
    """`f(hidden_states, encoder_hidden_states, mask, timestep) -> out`: one DiT call jitted over `mesh`.

    The model must already be placed (`parallel.shard_model` or `load_transformer(mesh=)`); inputs are
    split over the batch axes, the output comes back the same way. One program per (batch, masked?).
    """
    graphdef, state = nnx.split(model)
    state_sh = param_shardings(state, mesh)

    def fwd(state, hidden, enc, mask, sigma):
        m = nnx.merge(graphdef, state)
        return m(hidden_states=hidden, encoder_hidden_states=enc, encoder_hidden_states_mask=mask,
                 timestep=sigma, img_shapes=img_shapes)

    compiled: dict[tuple[int, bool], Any] = {}

    def call(hidden: jax.Array, enc: jax.Array, mask: jax.Array | None = None,
             sigma: jax.Array | None = None) -> jax.Array:
        key = (hidden.shape[0], mask is None)
        if key not in compiled:
            bs = batch_sharding(mesh, hidden.shape[0])
            compiled[key] = sharded_jit(fwd, mesh, in_shardings=(state_sh, bs, bs, None if mask is None else bs, bs),
                                        out_shardings=bs)
        return compiled[key](state, hidden, enc, mask, sigma)

    return call
