"""The JAX edit pipeline: images + prompt → Qwen2.5-VL and VAE encoders → compiled sampling loop → VAE decode.

    pipe = QwenImageEditPipeline.from_pretrained("Qwen-Image-Edit-2509", dtype=jnp.bfloat16)
    out = pipe(image=[a, b], prompt="…", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=50, seed=0)
    out.images[0].save("edit.png")

The counterpart of diffusers' `QwenImageEditPipeline` ("edit": Qwen-Image-Edit) and
`QwenImageEditPlusPipeline` ("edit_plus": -2509, and -2511 whose transformer has `zero_cond_t`),
read from the same diffusers repo folder. Same sizing rules as diffusers 0.42.1:

* edit: the (first) image is resized to ≈ 1 Mpx (`imaging.plan_sizes`, sides multiples
  of 32); that one image goes to the VL processor and to the VAE.
* edit_plus: each image goes to the VL processor at a 384² area and to the VAE at 1024², each rounded
  to multiples of 32; the output size follows the last image.
* The output defaults to the calculated ≈ 1 Mpx size; `height` / `width` are floored to multiples of
  `vae_scale_factor * 2` (16).

Given the same `latents` (packed noise `[B, N, 64]`), the result equals diffusers' (tests/test_pipeline.py)
with the text encoder called as it was trained (3D M-RoPE positions, see docs/text_encoder.md).
Differences, all deliberate: `seed` draws our own noise (`sampling.sample_noise`, JAX's generator), so a
seed gives other images than the same seed in torch — pass `latents` for identical noise; several
prompts are allowed for Edit-Plus (diffusers refuses batches), every prompt sharing the images;
masks are always kept (diffusers drops an all-ones mask, which changes nothing); no per-step callbacks
or custom `sigmas`, because the whole denoising loop is one compiled program (`sampling.sample`).

Components load once and can be released to free memory: `pipe.text_encoder = None` (15.5 GB of bf16
weights for the real model) after encoding the prompts, and pass `prompt_embeds=` afterwards; a stage
whose component is gone raises a one-line error that says so.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .config import DiTConfig, ModelOptions, as_dtype
from .encoding import QwenPromptEncoder
from .errors import CheckpointError
from .imaging import (
    CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE, ImageSizes, as_pil, numpy_to_pil, output_dims, plan_sizes, resize,
    to_numpy_images, vae_pixels,
)
from .loading import QwenImageVAE, load_text_encoder, load_transformer, load_vae
from .lora.merge import apply_lora
from .models.dit import QwenImageTransformer
from .packing import pack_latents, unpack_latents
from .preprocess import build_inputs
from .preprocess.postprocess import check_max_sequence_length
from .sampling import FlowMatchConfig, as_scheduler_config, read_scheduler_config, sample, sample_noise
from .utils import storage

VARIANT_OF_CLASS = {"QwenImageEditPipeline": "edit", "QwenImageEditPlusPipeline": "edit_plus"}
COMPONENTS = ("text_encoder", "vae", "transformer")
OUTPUT_TYPES = ("pil", "np", "latent")
@dataclasses.dataclass
class QwenImagePipelineOutput:
    """`images`: a list of PIL images ("pil"), float32 `[B, H, W, 3]` in [0, 1] ("np"), or the packed
    latents `[B, N, 64]` ("latent"), as diffusers' output of the same name."""

    images: Any


# ---- repo folder ---------------------------------------------------------------------------------
def model_index_class(repo_dir: str | os.PathLike) -> tuple[str, object]:
    """(path, `_class_name`) of the repo's `model_index.json`."""
    path = os.path.join(os.fspath(repo_dir), "model_index.json")
    try:
        with open(path) as f:
            name = json.load(f).get("_class_name")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a diffusers Qwen-Image-Edit repo folder has one; "
                              f"or pass variant='edit' / 'edit_plus')") from None
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a JSON object ({e})") from None
    return path, name


def pipeline_variant(repo_dir: str | os.PathLike) -> str:
    """"edit" or "edit_plus", from the `_class_name` in the repo's `model_index.json`."""
    path, name = model_index_class(repo_dir)
    if name not in VARIANT_OF_CLASS:
        raise ValueError(f"{path}: _class_name {name!r} is not an edit pipeline (expected one of "
                         f"{sorted(VARIANT_OF_CLASS)})")
    return VARIANT_OF_CLASS[name]


# `scheduler/scheduler_config.json` → FlowMatchConfig (missing keys: the scheduler class's defaults)
scheduler_from_json = read_scheduler_config


def transformer_config_source(path: str | os.PathLike, repo_dir: str | os.PathLike) -> str | None:
    """The config for a `transformer=` checkpoint: None when a config.json lies beside it, else the repo's."""
    path = os.fspath(path)
    if storage.isdir(path):
        folder = path
    else:
        folder = posixpath.dirname(path) if storage.is_remote(path) else os.path.dirname(path)
    if storage.exists(storage.join(folder, "config.json")):
        return None
    return os.path.join(os.fspath(repo_dir), "transformer", "config.json")


# ---- images in ---------------------------------------------------------------------------------
def images_per_prompt(image: Any, variant: str, batch: int) -> list[list[Image.Image]]:
    """One image list per prompt. edit: one image for all prompts, or one per prompt; edit_plus: one
    image or a list of images, shared by every prompt."""
    if image is None:
        raise ValueError("the edit pipelines need an input image (image=...)")
    images = [as_pil(x) for x in (image if isinstance(image, (list, tuple)) else [image])]
    if not images:
        raise ValueError("image is an empty list")
    if variant == "edit_plus":
        return [images] * batch
    if len(images) == 1:
        return [images] * batch
    if len(images) != batch:
        raise ValueError(f"the edit pipeline takes one image, or one per prompt; got {len(images)} images for "
                         f"{batch} prompts (several images per prompt need an Edit-Plus repo: 2509 / 2511)")
    return [[im] for im in images]


# ---- images out --------------------------------------------------------------------------------
def latents_to_images(vae: QwenImageVAE, latents: Any) -> list[Image.Image]:
    """Normalised latents `[B, C, h, w]` (e.g. sampled from a cache) → PIL images, as the pipeline decodes."""
    return numpy_to_pil(to_numpy_images(vae.decode(latents)))


def save_png(path: str | os.PathLike, image: Image.Image, metadata: dict[str, Any] | None = None, *,
             overwrite: bool = False) -> str:
    """Write a PNG atomically (a local file: temporary name, renamed when complete, file mode from the umask;
    `gs://`: one whole-object upload), with `metadata` as text chunks."""
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return storage.write_bytes(path, buf.getvalue(), overwrite=overwrite)


def random_seed() -> int:
    """A fresh seed for `seed=None` (diffusers draws fresh noise then too)."""
    return int(np.random.SeedSequence().entropy % (2**31))


def _expand(x: jax.Array | None, n: int) -> jax.Array | None:
    """Each row repeated `n` times in place (diffusers' `repeat(1, n, 1).view(B * n, …)`)."""
    return x if x is None or n == 1 else jnp.repeat(x, n, axis=0)


class QwenImageEditPipeline:
    """Qwen-Image-Edit / -2509 / -2511 in JAX; see the module docstring.

    Components (plain attributes; set one to None to free its memory): `text_encoder`
    (`QwenPromptEncoder`), `vae` (`QwenImageVAE`), `transformer` (`QwenImageTransformer`), and
    `scheduler` (`FlowMatchConfig`; given as one, a config dict or a JSON path). `variant` is "edit" or
    "edit_plus". `vae_image_area` and
    `condition_image_area` are diffusers' `VAE_IMAGE_SIZE` (1024²) and `CONDITION_IMAGE_SIZE` (384²);
    change them only to experiment (the tests shrink them to keep images tiny).
    """

    vae_image_area: int = VAE_IMAGE_SIZE
    condition_image_area: int = CONDITION_IMAGE_SIZE

    def __init__(self, *, transformer: QwenImageTransformer | None, vae: QwenImageVAE | None,
                 text_encoder: QwenPromptEncoder | None, scheduler: FlowMatchConfig | dict | str = FlowMatchConfig(),
                 variant: str = "edit_plus", dtype: Any = jnp.bfloat16, mesh: Mesh | None = None,
                 repo_dir: str | None = None):
        if variant not in ("edit", "edit_plus"):
            raise ValueError(f"variant must be 'edit' or 'edit_plus', got {variant!r}")
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.scheduler = as_scheduler_config(scheduler)
        self.variant, self.dtype, self.mesh, self.repo_dir = variant, as_dtype(dtype), mesh, repo_dir
        # as diffusers: 2 ** len(temperal_downsample) of the VAE (8), 8 without one; patches are 2×2 latents
        self.vae_scale_factor = vae.config.spatial_factor if vae is not None else 8

    @classmethod
    def from_pretrained(
        cls,
        repo_dir: str | os.PathLike,
        *,
        dtype: Any = jnp.bfloat16,
        mesh: Mesh | None = None,
        transformer: str | os.PathLike | QwenImageTransformer | None = None,
        lora: Any = None,
        attention: str | None = None,
        options: ModelOptions | None = None,
        components: Sequence[str] = COMPONENTS,
        variant: str | None = None,
        scheduler_config: str | os.PathLike | dict | FlowMatchConfig | None = None,
    ) -> "QwenImageEditPipeline":
        """Load a diffusers Qwen-Image-Edit(-2509/-2511) repo folder (`model_index.json`, `transformer/`,
        `vae/`, `text_encoder/`, `processor/`, `scheduler/`).

        dtype: weights and activations of every component (and the latents between steps, as diffusers
        keeps them in the text encoder's dtype). mesh: shard every component over it
        (`parallel.make_mesh`). transformer: a checkpoint to use instead of `transformer/` — any layout
        `load_transformer` reads, e.g. a merged Orbax checkpoint from convert/ or one safetensors file
        (the repo's config.json is used when none lies beside it) — or an already loaded model.
        lora: a LoRA file or a list of paths / (path, strength) pairs in any key style, merged into the
        weights (into a given model in place). attention: one kernel name for all three models
        (None: each one's default). options: the DiT's `ModelOptions` (overrides dtype / attention for it).
        components: which of "text_encoder", "vae", "transformer" to load (the others stay None).
        variant: "edit" / "edit_plus" instead of reading `model_index.json`.
        scheduler_config: the sampling schedule instead of the repo's `scheduler/scheduler_config.json` —
        a JSON file path, a dict of `FlowMatchEulerDiscreteScheduler` settings (e.g. Qwen-Image-Lightning's)
        or a `FlowMatchConfig`; `pipe.scheduler` can also be replaced later (see docs/sampling.md).
        """
        repo = os.fspath(repo_dir)
        if not os.path.isdir(repo):
            raise CheckpointError(f"{repo}: not a folder (expected a diffusers Qwen-Image-Edit repo folder)")
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
        variant = variant or pipeline_variant(repo)
        sched_path = os.path.join(repo, "scheduler", "scheduler_config.json")
        if scheduler_config is not None:
            scheduler = as_scheduler_config(scheduler_config)
        else:  # all released Qwen-Image repos hold the same scheduler config: the default when the file is missing
            scheduler = read_scheduler_config(sched_path) if os.path.exists(sched_path) else FlowMatchConfig()
        dt = as_dtype(dtype)
        kernel = {} if attention is None else {"attention": attention}
        text_encoder = vae = model = None
        if "text_encoder" in components:
            text_encoder = load_text_encoder(repo, dtype=dt, mesh=mesh, **kernel)
        if "vae" in components:
            vae = load_vae(os.path.join(repo, "vae"), dtype=dt, mesh=mesh, **kernel)
        if "transformer" in components:
            options = options or ModelOptions(param_dtype=dt, dtype=dt, **kernel)
            model = _load_dit(repo, transformer, mesh, lora, options)
        return cls(transformer=model, vae=vae, text_encoder=text_encoder, scheduler=scheduler, variant=variant,
                   dtype=dt, mesh=mesh, repo_dir=repo)

    # ---- stages ----------------------------------------------------------------------------------
    def _component(self, name: str, purpose: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"pipe.{name} is not loaded (released or left out of components=); it is needed "
                               f"{purpose}. Load it again, e.g. pipe.{name} = qwen_edit_jax.load_{name}(...)")
        return value

    def image_sizes(self, images: Sequence[Image.Image]) -> ImageSizes:
        """The resize plan of one prompt's images (see `plan_sizes`)."""
        return plan_sizes(images, self.variant, vae_area=self.vae_image_area, condition_area=self.condition_image_area)

    def encode_prompt(self, prompt: str | Sequence[str], image: Any = None, *, num_images_per_prompt: int = 1,
                      max_sequence_length: int = 1024) -> tuple[jax.Array, jax.Array]:
        """(prompt_embeds `[B·n, L, D]`, mask int32 `[B·n, L]`) for prompts and their images, as `__call__`
        conditions on them: `image` as `__call__` takes it (unresized), resized here the way the pipeline
        resizes before diffusers' `encode_prompt`, which this equals (the mask is always returned)."""
        check_max_sequence_length(max_sequence_length)
        prompts = _as_prompts(prompt)
        per_prompt = images_per_prompt(image, self.variant, len(prompts))
        return self._encode_prompts(prompts, per_prompt, self.image_sizes(per_prompt[0]), num_images_per_prompt)

    def _encode_prompts(self, prompts: list[str], per_prompt: Sequence[Sequence[Image.Image]], sizes: ImageSizes,
                        n: int) -> tuple[jax.Array, jax.Array]:
        """`encode_prompt` on checked arguments: every row's images resized by `sizes.condition`."""
        encoder = self._component("text_encoder", "to encode prompts (or pass prompt_embeds=)")
        condition = [[resize(im, *size) for im, size in zip(row, sizes.condition)] for row in per_prompt]
        processor = encoder.processor_for(self.variant)
        inputs = build_inputs(processor, prompts, condition, self.variant, resize_images=False)
        out = encoder.encode_inputs(inputs, processor.tokenizer.pad_token_id)
        length = int(out.lengths.max(initial=0))
        embeds, mask = out.embeds[:out.batch, :length], out.mask[:out.batch, :length]
        return _expand(embeds, n), _expand(mask, n)

    def encode_images(self, per_prompt: Sequence[Sequence[Image.Image]],
                      sizes: ImageSizes | None = None) -> tuple[jax.Array, list[tuple[int, ...]]]:
        """Packed, normalised reference latents `[B, N_ref, 64]` (every image of a row concatenated) and
        their `img_shapes` entries (1, h, w); rows are VAE-resized by `sizes` (default: the plan of the first row)."""
        vae = self._component("vae", "to encode the input images")
        sizes = sizes or self.image_sizes(per_prompt[0])
        shared = all(row is per_prompt[0] for row in per_prompt)
        rows = per_prompt[:1] if shared else per_prompt
        packed = []
        for j, size in enumerate(sizes.vae):
            pixels = np.stack([vae_pixels(row[j], size) for row in rows])
            packed.append(pack_latents(vae.encode(pixels)))
        latents = jnp.concatenate(packed, axis=1)
        if shared and len(per_prompt) > 1:
            latents = jnp.broadcast_to(latents, (len(per_prompt),) + latents.shape[1:])
        p = 2 * self.vae_scale_factor
        return latents, [(1, h // p, w // p) for w, h in sizes.vae]

    def decode_latents(self, latents: Any, height: int, width: int) -> jax.Array:
        """Packed latents `[B, N, 64]` of a `height`×`width` image → `[B, 3, H, W]` in [-1, 1] (fp32)."""
        vae = self._component("vae", "to decode latents into images (or use output_type='latent')")
        h, w = 2 * (height // (2 * self.vae_scale_factor)), 2 * (width // (2 * self.vae_scale_factor))
        return vae.decode(unpack_latents(jnp.asarray(latents, jnp.float32), h, w, frames_axis=False))

    def check_call(self, image: Any = None, prompt: str | Sequence[str] | None = None,
                   negative_prompt: str | Sequence[str] | None = None, true_cfg_scale: float = 4.0,
                   height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                   latents: Any = None, prompt_embeds: Any = None, prompt_embeds_mask: Any = None,
                   negative_prompt_embeds: Any = None, negative_prompt_embeds_mask: Any = None,
                   output_type: str = "pil", max_sequence_length: int = 512) -> "EditRequest":
        """Every check of `__call__`'s arguments, done once before any work; the derived `EditRequest`.

        Raises a one-line `ValueError` / `TypeError` naming the argument; warns where diffusers warns
        (CFG off although asked for, a size floored to the latent grid).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        check_max_sequence_length(max_sequence_length)
        prompts = None if prompt is None else _as_prompts(prompt)
        if prompt_embeds is not None:
            _check_embeds(prompt_embeds, prompt_embeds_mask, "prompt")
        batch = len(prompts) if prompts is not None else int(np.shape(prompt_embeds)[0])
        per_prompt = images_per_prompt(image, self.variant, batch)
        sizes = self.image_sizes(per_prompt[0])
        height, width = output_dims(height, width, sizes.output, 2 * self.vae_scale_factor)

        has_neg = negative_prompt is not None or negative_prompt_embeds is not None
        if true_cfg_scale > 1 and not has_neg:
            warnings.warn(f"true_cfg_scale is {true_cfg_scale}, but classifier-free guidance is off since no "
                          f"negative_prompt is given (as in diffusers; negative_prompt=' ' turns it on)", stacklevel=3)
        elif true_cfg_scale <= 1 and has_neg:
            warnings.warn("negative_prompt is given but classifier-free guidance is off since true_cfg_scale <= 1",
                          stacklevel=3)
        cfg = true_cfg_scale > 1 and has_neg
        negatives = None
        if cfg and negative_prompt_embeds is None:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != batch:
                raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
        elif cfg:
            _check_embeds(negative_prompt_embeds, negative_prompt_embeds_mask, "negative_prompt")

        model = self._component("transformer", "to denoise")
        p, n = 2 * self.vae_scale_factor, num_images_per_prompt
        shape = (batch * n, (height // p) * (width // p), model.config.in_channels)
        if latents is not None and tuple(np.shape(latents)) != shape:
            raise ValueError(f"latents must be packed noise of shape {list(shape)} for {batch * n} images of "
                             f"{height}×{width} (H×W), got {list(np.shape(latents))}")
        return EditRequest(prompts, negatives, per_prompt, sizes, height, width, n, cfg, shape)

    def __call__(
        self,
        image: Any = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        true_cfg_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        prompt_embeds_mask: Any = None,
        negative_prompt_embeds: Any = None,
        negative_prompt_embeds_mask: Any = None,
        output_type: str = "pil",
        max_sequence_length: int = 512,
        batch_cfg: bool | None = None,
    ) -> QwenImagePipelineOutput:
        """Edit `image` by `prompt`; arguments and defaults as diffusers' `__call__` (0.42.1).

        CFG runs when `true_cfg_scale > 1` and a negative prompt (or its embeddings) is given; the
        default `negative_prompt=None` therefore samples without CFG, as in diffusers (the Qwen model
        cards pass `negative_prompt=" "`). `seed` draws JAX noise (not torch's); `latents`: packed noise
        `[B·n, N, 64]` (numpy or JAX), used as is. `prompt_embeds` (+ mask) replace the text encoder
        (e.g. after `pipe.text_encoder = None`); a string `negative_prompt` applies to every prompt.
        `batch_cfg=False` runs the two CFG passes one after the other (half the activation memory), `True`
        as one batch; None picks per platform (`sampling.default_batch_cfg`: separate on CPU).
        The arguments are checked once, up front (`check_call`).
        """
        req = self.check_call(image, prompt, negative_prompt, true_cfg_scale, height, width, num_images_per_prompt,
                              latents, prompt_embeds, prompt_embeds_mask, negative_prompt_embeds,
                              negative_prompt_embeds_mask, output_type, max_sequence_length)
        n = req.num_images_per_prompt
        if req.prompts is not None:
            prompt_embeds, prompt_embeds_mask = self._encode_prompts(req.prompts, req.images, req.sizes, n)
        else:
            prompt_embeds, prompt_embeds_mask = _expand_embeds(prompt_embeds, prompt_embeds_mask, n)
        neg = neg_mask = None
        if req.negative_prompts is not None:
            neg, neg_mask = self._encode_prompts(req.negative_prompts, req.images, req.sizes, n)
        elif req.cfg:
            neg, neg_mask = _expand_embeds(negative_prompt_embeds, negative_prompt_embeds_mask, n)

        refs, ref_shapes = self.encode_images(req.images, req.sizes)
        refs = _expand(refs, n)
        model = self._component("transformer", "to denoise")
        if latents is None:
            noise = jnp.asarray(sample_noise(random_seed() if seed is None else seed, req.noise_shape), self.dtype)
        else:
            noise = jnp.asarray(latents, self.dtype)
        p = 2 * self.vae_scale_factor
        target = (1, req.height // p, req.width // p)
        out = sample(model, noise=noise, image_latents=refs, prompt_embeds=prompt_embeds,
                     prompt_embeds_mask=prompt_embeds_mask, negative_prompt_embeds=neg,
                     negative_prompt_embeds_mask=neg_mask, true_cfg_scale=true_cfg_scale if req.cfg else 1.0,
                     num_inference_steps=num_inference_steps, img_shapes=[target, *ref_shapes], batch_cfg=batch_cfg,
                     scheduler=self.scheduler, mesh=self.mesh)
        if output_type == "latent":
            return QwenImagePipelineOutput(images=out)
        images = to_numpy_images(self.decode_latents(out, req.height, req.width))
        return QwenImagePipelineOutput(images=images if output_type == "np" else numpy_to_pil(images))


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """A checked `__call__` (`QwenImageEditPipeline.check_call`): what the stages need, derived once."""

    prompts: list[str] | None  # None: prompt_embeds were given
    negative_prompts: list[str] | None  # to encode: CFG on and no negative_prompt_embeds given
    images: list[list[Image.Image]]  # per prompt
    sizes: ImageSizes  # the resize plan of the first prompt's images
    height: int  # output size, floored to the latent grid
    width: int
    num_images_per_prompt: int
    cfg: bool  # classifier-free guidance on
    noise_shape: tuple[int, int, int]  # packed noise [B·n, N, C]


def _as_prompts(prompt: str | Sequence[str]) -> list[str]:
    """One prompt or a non-empty list of them, as a list."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt is an empty list")
    return prompts


def _check_embeds(embeds: Any, mask: Any, what: str) -> None:
    """User-given embeddings are `[B, L, D]`, their mask (if any) `[B, L]`."""
    if np.ndim(embeds) != 3:
        raise ValueError(f"{what}_embeds must be [B, L, D], got shape {list(np.shape(embeds))}")
    if mask is not None and tuple(np.shape(mask)) != tuple(np.shape(embeds))[:2]:
        raise ValueError(f"{what}_embeds_mask shape {list(np.shape(mask))} does not match {what}_embeds "
                         f"{list(np.shape(embeds))[:2]}")


def _expand_embeds(embeds: Any, mask: Any, n: int) -> tuple[jax.Array, jax.Array | None]:
    """Checked user-given embeddings (and mask) as JAX arrays, each row repeated per image."""
    return _expand(jnp.asarray(embeds), n), None if mask is None else _expand(jnp.asarray(mask), n)


def _load_dit(repo: str, transformer: Any, mesh: Mesh | None, lora: Any,
              options: ModelOptions) -> QwenImageTransformer:
    """The repo's `transformer/`, another checkpoint, or a given model (LoRA merged in either case)."""
    if transformer is None:
        return load_transformer(os.path.join(repo, "transformer"), options=options, mesh=mesh, lora=lora)
    if isinstance(transformer, QwenImageTransformer):
        model = transformer if lora is None else apply_lora(transformer, lora)
    else:
        path = os.fspath(transformer)
        if not storage.exists(path):
            raise CheckpointError(f"transformer={path}: no such file or folder")
        model = load_transformer(path, options=options, mesh=mesh, lora=lora,
                                 config=transformer_config_source(path, repo))
    repo_config = os.path.join(repo, "transformer", "config.json")
    if os.path.exists(repo_config) and DiTConfig.from_json(repo_config).zero_cond_t != model.config.zero_cond_t:
        warnings.warn(f"the given transformer has zero_cond_t={model.config.zero_cond_t} but {repo_config} says "
                      f"{not model.config.zero_cond_t} (Edit-2511 uses zero_cond_t=True): is it the right model?",
                      stacklevel=3)
    return model


__all__ = ["COMPONENTS", "EditRequest", "QwenImageEditPipeline", "QwenImagePipelineOutput", "images_per_prompt",
           "latents_to_images", "pipeline_variant", "random_seed", "save_png", "scheduler_from_json",
           "transformer_config_source"]
