"""Sampling examples of the training cache: batching by layout, fixed per-sample noise, validation distance, files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..models.dit import QwenImageTransformer
from ..packing import pack_latents, unpack_latents
from ..utils.files import check_output_dir
from ..weights.safetensors_io import save_tensors
from .loop import sample
from .schedule import QWEN_IMAGE_SCHEDULER, FlowMatchConfig

F32 = jnp.float32


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
    batch_cfg: bool | None = None,
    mesh: Any = None,
    scheduler: FlowMatchConfig = QWEN_IMAGE_SCHEDULER,
) -> list[np.ndarray]:
    """Sample the target latents of cached examples (`cache_format.CachedSample`) → `[C, h, w]` float32 each.

    All samples must share one image layout (target and reference sizes); prompts may differ in
    length (padded with masks, which is exact). The output has the cached target's size. CFG runs
    when every sample carries a negative prompt and `true_cfg_scale > 1`. Noise comes from
    `sample_noise(seed, …, sample_id)`, so a sample's result does not depend on its batch-mates.
    `latent_dtype` (kept between steps) defaults to the model's activation dtype. `scheduler`: the
    sampling schedule (`FlowMatchConfig`; default Qwen-Image's).
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
    scale = cfg_scale_used(samples, true_cfg_scale)
    out = sample(model, noise=jnp.asarray(noise, dtype), image_latents=None if refs is None else jnp.asarray(refs, dtype),
                 prompt_embeds=jnp.asarray(pos, dtype), prompt_embeds_mask=jnp.asarray(pos_mask),
                 negative_prompt_embeds=None if neg is None else jnp.asarray(neg, dtype),
                 negative_prompt_embeds_mask=None if neg is None else jnp.asarray(neg_mask),
                 true_cfg_scale=scale, num_inference_steps=num_inference_steps, img_shapes=list(layout),
                 batch_cfg=batch_cfg, scheduler=scheduler, mesh=mesh)
    lat = unpack_latents(np.asarray(out, np.float32), h, w, frames_axis=False)
    return [np.ascontiguousarray(x) for x in lat]


def cfg_scale_used(samples: Sequence[Any], true_cfg_scale: float) -> float:
    """The CFG scale `sample_cached_batch` applies: `true_cfg_scale` when it is > 1 and every sample has a
    cached negative prompt, else 1 (no CFG)."""
    if true_cfg_scale > 1 and all(getattr(s, "negative_prompt_embeds", None) is not None for s in samples):
        return float(true_cfg_scale)
    return 1.0


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
    batch_cfg: bool | None = None,
    mesh: Any = None,
    scheduler: FlowMatchConfig = QWEN_IMAGE_SCHEDULER,
) -> float:
    """RMS distance between a sampled latent and the cached target of one fixed example.

    For the trainer's periodic validation: fixed noise (`seed`) and prompt, so the number moves only
    with the weights. Lower is closer to the target edit; a proxy, not an image metric. The loop
    runs with fp32 latents.
    """
    out = sample_cached(model, sample, num_inference_steps=num_inference_steps, true_cfg_scale=true_cfg_scale,
                        seed=seed, latent_dtype=np.float32, batch_cfg=batch_cfg, mesh=mesh, scheduler=scheduler)
    return float(np.sqrt(np.mean((out - np.asarray(sample.target, np.float32)) ** 2)))


def save_latents(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                 *, overwrite: bool = False) -> str:
    """Write `{name: array}` as a safetensors file atomically (temporary name, renamed when complete)."""
    return save_tensors(path, tensors, metadata or {}, overwrite=overwrite)


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
    batch_cfg: bool | None = None  # None: per platform (sampling.loop.default_batch_cfg)
    latent_dtype: Any = None  # None: the model's activation dtype
    scheduler: FlowMatchConfig = QWEN_IMAGE_SCHEDULER  # the sampling schedule (diffusers' scheduler settings)

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
    warn: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Sample cached examples (`cache_format.CachedDataset`) and write one safetensors file each.

    `OUT/<sample id>.safetensors` holds `latents` [C, h, w] float32 — the normalised VAE latent, the
    same space as the cache's `target` — with the sample id, settings and `metadata` in its header.
    The header's `true_cfg_scale` is the scale actually used for that sample: CFG needs a cached
    negative prompt, so samples without one are sampled at 1 (`requested_true_cfg_scale` keeps the
    setting), and `warn` (default `warnings.warn`) says so once, before sampling.
    Every file is written atomically; existing files are an error unless `overwrite` or `skip_existing`.
    A run that fails before writing any file removes `out_dir` if it created it.
    Returns {sample id: path} of the files written or kept.
    """
    out_dir = check_output_dir(out_dir, "out_dir")
    indices = list(range(len(dataset))) if indices is None else list(indices)
    paths, todo = plan_outputs(dataset, indices, out_dir, overwrite=overwrite, skip_existing=skip_existing)
    no_neg = [i for i in todo if dataset.infos[i].negative_prompt_len is None]
    if settings.true_cfg_scale > 1 and no_neg:
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(
            f"true_cfg_scale={settings.true_cfg_scale} but {len(no_neg)} of {len(todo)} samples have no cached "
            f"negative prompt: those are sampled without CFG (scale 1), and their files record true_cfg_scale=1.0")
    created = not os.path.lexists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    header = {"format": "qwen-edit-jax/sampled-latents", "tensor": "latents [C, h, w] normalised VAE latent",
              "num_inference_steps": settings.num_inference_steps,
              "requested_true_cfg_scale": settings.true_cfg_scale,
              "seed": settings.seed, "latent_dtype": str(np.dtype(settings.latent_dtype or model.options.dtype)),
              "scheduler": json.dumps(dataclasses.asdict(settings.scheduler)),
              **(metadata or {})}
    bar = tqdm(total=len(todo), desc="sample", unit="sample", disable=not progress)
    try:
        for batch in plan_batches(dataset, todo, settings.batch_size):
            samples = [dataset[i] for i in batch]
            outs = sample_cached_batch(
                model, samples, num_inference_steps=settings.num_inference_steps,
                true_cfg_scale=settings.true_cfg_scale, seed=settings.seed, latent_dtype=settings.latent_dtype,
                batch_cfg=settings.batch_cfg, mesh=mesh, scheduler=settings.scheduler)
            used = cfg_scale_used(samples, settings.true_cfg_scale)
            for i, s, lat in zip(batch, samples, outs):
                save_latents(paths[i], {"latents": lat}, {**header, "true_cfg_scale": used, "sample_id": s.sample_id},
                             overwrite=overwrite)
            bar.update(len(batch))
    except BaseException:
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)  # leave no empty folder behind
        raise
    finally:
        bar.close()
    return {dataset.infos[i].sample_id: paths[i] for i in indices}
