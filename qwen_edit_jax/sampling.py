"""Edit sampling: flow-match Euler with dynamic shift and true CFG, numerically equal to diffusers.

Mirrors the denoising loop of diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`
(`FlowMatchEulerDiscreteScheduler` with the Qwen-Image scheduler config) in one compiled program:
the whole loop is a `jax.lax.fori_loop` inside `jax.jit`, so there is no per-step Python dispatch.
The conditional and unconditional (negative-prompt) passes run as one batch-2B forward by default;
`batch_cfg=False` runs them one after the other to halve activation memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .packing import pack_latents, unpack_latents
from .transformer import QwenImageTransformer, normalize_img_shapes

F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
    """`FlowMatchEulerDiscreteScheduler` settings (defaults: Qwen-Image's `scheduler_config.json`)."""

    num_train_timesteps: int = 1000
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"  # or "linear"

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError(f"max_image_seq_len {self.max_image_seq_len} must exceed "
                             f"base_image_seq_len {self.base_image_seq_len}")
        if self.shift_terminal is not None and not 0.0 <= self.shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must be in [0, 1), got {self.shift_terminal}")


QWEN_IMAGE_SCHEDULER = FlowMatchConfig()


def exponential_shift(sigmas: np.ndarray, mu: float) -> np.ndarray:
    """σ ← e^μ / (e^μ + 1/σ − 1) (keeps the dtype of `sigmas`)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Rescale 1−σ so that the last σ equals `shift_terminal` (the scheduler's `stretch_shift_to_terminal`)."""
    one_minus_z = 1 - sigmas
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    return 1 - (one_minus_z / scale_factor)


def calculate_shift(image_seq_len: int, config: FlowMatchConfig = QWEN_IMAGE_SCHEDULER) -> float:
    """μ, linear in the number of *target* tokens (reference tokens are not counted), as the pipelines do."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def flow_match_sigmas(
    num_inference_steps: int,
    image_seq_len: int | None = None,
    *,
    mu: float | None = None,
    config: FlowMatchConfig = QWEN_IMAGE_SCHEDULER,
) -> np.ndarray:
    """The n+1 float32 sigmas (1 … shift_terminal, then 0) that diffusers' scheduler produces.

    Give `image_seq_len` (target tokens, (H/16)·(W/16)) or `mu` directly. The arithmetic is done
    with the same float32 numpy operations as `FlowMatchEulerDiscreteScheduler.set_timesteps`, so the
    result is bit-identical, not merely close. One exception: for a single step diffusers' terminal
    stretch divides 0 by 0 (NaN sigmas); here the stretch is skipped then, giving [1, 0].
    """
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if mu is None:
        if image_seq_len is None or image_seq_len < 1:
            raise ValueError(f"flow_match_sigmas needs image_seq_len (target tokens) >= 1 or mu; got {image_seq_len}")
        mu = calculate_shift(int(image_seq_len), config)
    sigmas = np.linspace(1.0, 1 / n, n).astype(np.float32)
    if config.time_shift_type == "exponential":
        sigmas = exponential_shift(sigmas, mu)
    else:
        sigmas = mu / (mu + (1 / sigmas - 1))
    if config.shift_terminal and n > 1:
        sigmas = stretch_to_terminal(sigmas, config.shift_terminal)
    return np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])


def model_timesteps(sigmas: np.ndarray, dtype: Any = np.float32, num_train_timesteps: int = 1000) -> np.ndarray:
    """The σ the model sees at each step: the pipelines pass `t.to(latents.dtype) / 1000` with t = σ·1000.

    In fp32 that is σ up to one rounding; in bf16 it rounds σ (0.98696 → 0.98828), which is what the
    reference pipeline feeds the model, so we replicate it. Returned as float32 values (exact in `dtype`).
    """
    dtype = np.dtype(dtype)
    t = np.asarray(sigmas[:-1], np.float32) * np.float32(num_train_timesteps)
    return (t.astype(dtype) / np.asarray(num_train_timesteps, dtype)).astype(np.float32)


def cfg_combine(cond: jax.Array, uncond: jax.Array, scale: jax.Array | float) -> jax.Array:
    """True CFG with per-token norm rescale (fp32): comb = u + s·(c − u); v = comb·‖c‖/‖comb‖ over features."""
    c, u = cond.astype(F32), uncond.astype(F32)
    comb = u + scale * (c - u)
    cond_norm = jnp.linalg.norm(c, axis=-1, keepdims=True)
    comb_norm = jnp.linalg.norm(comb, axis=-1, keepdims=True)
    return comb * (cond_norm / comb_norm)


def euler_step(latents: jax.Array, velocity: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """x ← x + (σ_next − σ)·v in fp32, cast back to the latent dtype (as `scheduler.step` does)."""
    out = latents.astype(F32) + (sigma_next - sigma) * velocity.astype(F32)
    return out.astype(latents.dtype)


# --------------------------------------------------------------------------------------------
# Sampling loop
# --------------------------------------------------------------------------------------------


def _pad_text(embeds: jax.Array, mask: jax.Array | None, length: int) -> tuple[jax.Array, jax.Array]:
    """Right-pad [B, L, D] embeddings with zeros to `length` and return a matching [B, length] bool mask."""
    b, l, _ = embeds.shape
    mask = jnp.ones((b, l), bool) if mask is None else mask.astype(bool)
    pad = length - l
    if pad:
        embeds = jnp.pad(embeds, ((0, 0), (0, pad), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    return embeds, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "mode", "mesh"))
def _denoise(graphdef, state, latents, refs, pos, pos_mask, neg, neg_mask, sigmas, timesteps, cfg_scale, *,
             layout, mode, mesh=None):
    """The compiled loop. `mode`: 'none' (no CFG), 'batched' (cond ‖ uncond in one forward), 'separate'."""
    model = nnx.merge(graphdef, state)
    b, n_target, _ = latents.shape

    def split_batch(x):  # the 2B CFG batch: spread cond/uncond over the batch axes when it divides
        if mesh is None:
            return x
        from .sharding import batch_sharding

        return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.shape[0]))

    def forward(x, emb, mask, t):
        return model(hidden_states=x, encoder_hidden_states=emb, encoder_hidden_states_mask=mask,
                     timestep=t, img_shapes=layout)[:, :n_target]

    def velocity(x, t):
        inp = x if refs is None else jnp.concatenate([x, refs], axis=1)
        tb = jnp.full((b,), t, F32)
        if mode == "none":
            return forward(inp, pos, pos_mask, tb)
        if mode == "batched":
            both = [None if p[0] is None else split_batch(jnp.concatenate(p))
                    for p in ((inp, inp), (pos, neg), (pos_mask, neg_mask), (tb, tb))]
            out = forward(*both)
            cond, uncond = out[:b], out[b:]
        else:
            cond, uncond = forward(inp, pos, pos_mask, tb), forward(inp, neg, neg_mask, tb)
        return cfg_combine(cond, uncond, cfg_scale)

    def body(i, x):
        return euler_step(x, velocity(x, timesteps[i]), sigmas[i], sigmas[i + 1])

    return jax.lax.fori_loop(0, timesteps.shape[0], body, latents)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


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
    batch_cfg: bool = True,
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
    one with key masks, which leaves the result unchanged. `batch_cfg=False` runs the two passes
    separately (half the activation memory). With `mesh`, the batch is split over the mesh's batch
    axes (`sharding.batch_sharding`; the doubled CFG batch too, so with B = 1 on a data axis of 2 the
    cond and uncond passes run on different devices); place the model first with
    `sharding.shard_model` or `load_transformer(mesh=)`.
    """
    _check(noise.ndim == 3, f"noise must be packed latents [B, N_target, C], got shape {tuple(noise.shape)}")
    b, n_target, c = noise.shape
    _check(c == model.config.in_channels,
           f"noise has {c} features per token, the model expects in_channels={model.config.in_channels}")
    n_ref = 0
    if image_latents is not None:
        _check(image_latents.ndim == 3 and image_latents.shape[0] == b and image_latents.shape[2] == c,
               f"image_latents must be packed [B={b}, N_ref, {c}], got shape {tuple(image_latents.shape)}")
        n_ref = image_latents.shape[1]
    _check(prompt_embeds.ndim == 3 and prompt_embeds.shape[0] == b,
           f"prompt_embeds must be [B={b}, L, D], got shape {tuple(prompt_embeds.shape)}")
    layout = normalize_img_shapes(img_shapes, b, n_target + n_ref)
    _check(int(np.prod(layout[0])) == n_target,
           f"img_shapes[0] {layout[0]} describes {int(np.prod(layout[0]))} target tokens but noise has {n_target}")
    if prompt_embeds_mask is not None:
        _check(tuple(prompt_embeds_mask.shape) == tuple(prompt_embeds.shape[:2]),
               f"prompt_embeds_mask shape {tuple(prompt_embeds_mask.shape)} != {tuple(prompt_embeds.shape[:2])}")
    has_neg = negative_prompt_embeds is not None
    if true_cfg_scale > 1 and not has_neg:
        warnings.warn(f"true_cfg_scale={true_cfg_scale} but no negative prompt: CFG is off (as in diffusers)",
                      stacklevel=2)
    do_cfg = true_cfg_scale > 1 and has_neg
    if do_cfg:
        _check(negative_prompt_embeds.ndim == 3 and negative_prompt_embeds.shape[0] == b
               and negative_prompt_embeds.shape[2] == prompt_embeds.shape[2],
               f"negative_prompt_embeds must be [B={b}, L_neg, {prompt_embeds.shape[2]}], "
               f"got shape {tuple(negative_prompt_embeds.shape)}")
        if negative_prompt_embeds_mask is not None:
            _check(tuple(negative_prompt_embeds_mask.shape) == tuple(negative_prompt_embeds.shape[:2]),
                   f"negative_prompt_embeds_mask shape {tuple(negative_prompt_embeds_mask.shape)} != "
                   f"{tuple(negative_prompt_embeds.shape[:2])}")

    latent_dtype = np.dtype(noise.dtype)
    sigmas = flow_match_sigmas(num_inference_steps, n_target, config=scheduler)
    timesteps = model_timesteps(sigmas, latent_dtype, scheduler.num_train_timesteps)

    pos, pos_mask = jnp.asarray(prompt_embeds), None if prompt_embeds_mask is None else jnp.asarray(prompt_embeds_mask)
    neg = neg_mask = None
    mode = "none"
    if do_cfg:
        neg = jnp.asarray(negative_prompt_embeds)
        neg_mask = None if negative_prompt_embeds_mask is None else jnp.asarray(negative_prompt_embeds_mask)
        mode = "batched" if batch_cfg else "separate"
        if batch_cfg and not (pos_mask is None and neg_mask is None and pos.shape[1] == neg.shape[1]):
            length = max(pos.shape[1], neg.shape[1])
            pos, pos_mask = _pad_text(pos, pos_mask, length)
            neg, neg_mask = _pad_text(neg, neg_mask, length)
    latents = jnp.asarray(noise)
    refs = None if image_latents is None else jnp.asarray(image_latents).astype(latent_dtype)

    args = (latents, refs, pos, pos_mask, neg, neg_mask, jnp.asarray(sigmas), jnp.asarray(timesteps),
            jnp.asarray(true_cfg_scale, F32))
    graphdef, state = nnx.split(model)
    if mesh is None:
        return _denoise(graphdef, state, *args, layout=layout, mode=mode)
    from .sharding import batch_sharding, replicated

    data = jax.device_put(args[:6], batch_sharding(mesh, b))
    rest = jax.device_put(args[6:], replicated(mesh))
    with jax.set_mesh(mesh):
        return _denoise(graphdef, state, *data, *rest, layout=layout, mode=mode, mesh=mesh)


# --------------------------------------------------------------------------------------------
# Cached samples (training cache format): sampling examples, validation distance, output files
# --------------------------------------------------------------------------------------------


def latent_img_shape(latent_shape: Sequence[int], *, source: str = "latent") -> tuple[int, int, int]:
    """(1, h/2, w/2) token grid of an unpacked [C, h, w] latent."""
    shape = tuple(int(v) for v in latent_shape)
    if len(shape) != 3 or shape[1] % 2 or shape[2] % 2 or min(shape) <= 0:
        raise ValueError(f"{source}: expected a latent [C, h, w] with even h and w, got shape {shape}")
    return (1, shape[1] // 2, shape[2] // 2)


def sample_noise(seed: int, shape: Sequence[int], sample_id: str | None = None) -> np.ndarray:
    """Standard-normal float32 noise; with `sample_id` the stream depends on the id, not on the batch or order."""
    key = jax.random.key(int(seed))
    if sample_id is not None:
        key = jax.random.fold_in(key, zlib.crc32(sample_id.encode()) & 0x7FFFFFFF)
    return np.array(jax.random.normal(key, tuple(shape), F32))


def _stack_text(embeds: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], sid: Sequence[str], what: str):
    """Right-pad per-sample [L_i, D] embeddings to one [B, L, D] batch with a [B, L] bool mask."""
    for e, s in zip(embeds, sid):
        if np.ndim(e) != 2:
            raise ValueError(f"sample {s}: {what} must be [L, D], got shape {tuple(np.shape(e))}")
    length = max(e.shape[0] for e in embeds)
    out = np.zeros((len(embeds), length, embeds[0].shape[1]), np.float32)
    mask = np.zeros((len(embeds), length), bool)
    for i, (e, m) in enumerate(zip(embeds, masks)):
        out[i, : e.shape[0]] = np.asarray(e, np.float32)
        mask[i, : e.shape[0]] = True if m is None else np.asarray(m, bool)
    return out, mask


def sample_cached_batch(
    model: QwenImageTransformer,
    samples: Sequence[Any],
    *,
    num_inference_steps: int = 50,
    true_cfg_scale: float = 4.0,
    seed: int = 0,
    latent_dtype: Any = None,
    batch_cfg: bool = True,
    mesh: Any = None,
) -> list[np.ndarray]:
    """Sample the target latents of cached examples (`training.data.CachedSample`) → `[C, h, w]` float32 each.

    All samples must share one image layout (target and reference sizes); prompts may differ in
    length (padded with masks, which is exact). The output has the cached target's size. CFG runs
    when every sample carries a negative prompt and `true_cfg_scale > 1`. Noise comes from
    `sample_noise(seed, …, sample_id)`, so a sample's result does not depend on its batch-mates.
    `latent_dtype` (kept between steps) defaults to the model's activation dtype.
    """
    if not samples:
        return []
    ids = [str(getattr(s, "sample_id", i)) for i, s in enumerate(samples)]
    layouts = []
    for s, sid in zip(samples, ids):
        if getattr(s, "target", None) is None:
            raise ValueError(f"sample {sid}: no cached target latent (its shape sets the output size)")
        layouts.append((latent_img_shape(np.shape(s.target), source=f"sample {sid} target"),
                        *(latent_img_shape(np.shape(r), source=f"sample {sid} reference {j}")
                          for j, r in enumerate(s.references or []))))
    if any(lay != layouts[0] for lay in layouts):
        raise ValueError(f"samples {ids} do not share one image layout ({sorted(set(layouts))}); batch them by layout")
    layout = layouts[0]
    channels = model.config.in_channels // 4
    c, h, w = (int(v) for v in np.shape(samples[0].target))
    if c != channels:
        raise ValueError(f"sample {ids[0]}: target has {c} channels, the model expects {channels}")
    dtype = np.dtype(latent_dtype) if latent_dtype is not None else np.dtype(model.options.dtype)
    n_target = layout[0][1] * layout[0][2]
    noise = np.stack([sample_noise(seed, (n_target, 4 * channels), sid) for sid in ids])
    refs = None
    if len(layout) > 1:
        refs = np.stack([np.concatenate([pack_latents(np.asarray(r, np.float32)[None])[0] for r in s.references])
                         for s in samples])
    pos, pos_mask = _stack_text([s.prompt_embeds for s in samples], [getattr(s, "prompt_mask", None) for s in samples],
                                ids, "prompt_embeds")
    has_neg = [getattr(s, "negative_prompt_embeds", None) is not None for s in samples]
    neg = neg_mask = None
    if true_cfg_scale > 1 and all(has_neg):
        neg, neg_mask = _stack_text([s.negative_prompt_embeds for s in samples],
                                    [getattr(s, "negative_prompt_mask", None) for s in samples], ids,
                                    "negative_prompt_embeds")
    elif true_cfg_scale > 1 and any(has_neg):
        raise ValueError(f"samples {ids}: some have a negative prompt and some not; batch them separately")
    scale = true_cfg_scale if neg is not None else 1.0
    out = sample(model, noise=jnp.asarray(noise, dtype), image_latents=None if refs is None else jnp.asarray(refs, dtype),
                 prompt_embeds=jnp.asarray(pos, dtype), prompt_embeds_mask=jnp.asarray(pos_mask),
                 negative_prompt_embeds=None if neg is None else jnp.asarray(neg, dtype),
                 negative_prompt_embeds_mask=None if neg is None else jnp.asarray(neg_mask),
                 true_cfg_scale=scale, num_inference_steps=num_inference_steps, img_shapes=list(layout),
                 batch_cfg=batch_cfg, mesh=mesh)
    lat = unpack_latents(np.asarray(out, np.float32), h, w, frames_axis=False)
    return [np.ascontiguousarray(x) for x in lat]


def sample_cached(model: QwenImageTransformer, cached: Any, **kwargs: Any) -> np.ndarray:
    """`sample_cached_batch` for one example → its sampled `[C, h, w]` latent."""
    return sample_cached_batch(model, [cached], **kwargs)[0]


def validation_distance(
    model: QwenImageTransformer,
    sample: Any,
    *,
    num_inference_steps: int = 20,
    seed: int = 0,
    true_cfg_scale: float = 4.0,
    batch_cfg: bool = True,
    mesh: Any = None,
) -> float:
    """RMS distance between a sampled latent and the cached target of one fixed example.

    For the trainer's periodic validation: fixed noise (`seed`) and prompt, so the number moves only
    with the weights. Lower is closer to the target edit; a proxy, not an image metric. The loop
    runs with fp32 latents.
    """
    out = sample_cached(model, sample, num_inference_steps=num_inference_steps, true_cfg_scale=true_cfg_scale,
                        seed=seed, latent_dtype=np.float32, batch_cfg=batch_cfg, mesh=mesh)
    return float(np.sqrt(np.mean((out - np.asarray(sample.target, np.float32)) ** 2)))


def save_latents(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                 *, overwrite: bool = False) -> str:
    """Write `{name: array}` as a safetensors file atomically (temporary name, renamed when complete)."""
    from safetensors.numpy import save_file

    from .weights.writer import atomic_path

    path = os.path.abspath(os.fspath(path))
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def output_name(sample_id: str) -> str:
    """A file name for a sample id: safe characters kept, anything else replaced (plus a hash if so)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id).lstrip(".") or "sample"
    if safe != sample_id:
        safe = f"{safe[:100]}-{zlib.crc32(sample_id.encode()):08x}"
    return f"{safe}.safetensors"


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Sampling settings recorded with every output file."""

    num_inference_steps: int = 50
    true_cfg_scale: float = 4.0
    seed: int = 0
    batch_size: int = 1
    batch_cfg: bool = True
    latent_dtype: Any = None  # None: the model's activation dtype

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def plan_batches(dataset: Any, indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group dataset indices into batches of one image layout and the same negative-prompt presence."""
    groups: dict[Any, list[int]] = {}
    for i in indices:
        info = dataset.infos[i]
        groups.setdefault((info.img_shapes, info.negative_prompt_len is not None), []).append(i)
    return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def plan_outputs(dataset: Any, indices: Sequence[int], out_dir: str | os.PathLike, *, overwrite: bool = False,
                 skip_existing: bool = False) -> tuple[dict[int, str], list[int]]:
    """Output path per selected index, and the indices still to sample; refuses to clobber files.

    Cheap (no model): the command calls it before loading weights so a clash fails fast.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    paths = {i: os.path.join(out_dir, output_name(dataset.infos[i].sample_id)) for i in indices}
    if len(set(paths.values())) != len(paths):
        raise ValueError("two selected samples map to the same output file name; select each sample once")
    todo = [i for i in indices if not (skip_existing and os.path.exists(paths[i]))]
    if not overwrite:
        for i in todo:
            if os.path.lexists(paths[i]):
                raise FileExistsError(f"{paths[i]} already exists; pass overwrite (--overwrite) or "
                                      f"skip_existing (--skip-existing)")
    return paths, todo


def sample_dataset(
    model: QwenImageTransformer,
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    settings: SampleSettings = SampleSettings(),
    indices: Sequence[int] | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    metadata: dict[str, str] | None = None,
    mesh: Any = None,
    progress: bool = True,
) -> dict[str, str]:
    """Sample cached examples (`training.data.CachedDataset`) and write one safetensors file each.

    `OUT/<sample id>.safetensors` holds `latents` [C, h, w] float32 — the normalised VAE latent, the
    same space as the cache's `target` — with the sample id, settings and `metadata` in its header.
    Every file is written atomically; existing files are an error unless `overwrite` or `skip_existing`.
    Returns {sample id: path} of the files written or kept.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    indices = list(range(len(dataset))) if indices is None else list(indices)
    paths, todo = plan_outputs(dataset, indices, out_dir, overwrite=overwrite, skip_existing=skip_existing)
    os.makedirs(out_dir, exist_ok=True)
    header = {"format": "qwen-edit-jax/sampled-latents", "tensor": "latents [C, h, w] normalised VAE latent",
              "num_inference_steps": settings.num_inference_steps, "true_cfg_scale": settings.true_cfg_scale,
              "seed": settings.seed, "latent_dtype": str(np.dtype(settings.latent_dtype or model.options.dtype)),
              **(metadata or {})}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="sample", unit="sample")
    try:
        for batch in plan_batches(dataset, todo, settings.batch_size):
            samples = [dataset[i] for i in batch]
            outs = sample_cached_batch(
                model, samples, num_inference_steps=settings.num_inference_steps,
                true_cfg_scale=settings.true_cfg_scale, seed=settings.seed, latent_dtype=settings.latent_dtype,
                batch_cfg=settings.batch_cfg, mesh=mesh)
            for i, s, lat in zip(batch, samples, outs):
                save_latents(paths[i], {"latents": lat}, {**header, "sample_id": s.sample_id}, overwrite=overwrite)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return {dataset.infos[i].sample_id: paths[i] for i in indices}
