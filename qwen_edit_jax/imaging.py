"""Image sizing and PIL ⇄ array conversion: the one implementation the pipeline, caching, prompt
preprocessing and validation share (diffusers 0.42.1's rules, so a cache, a prompt and a sampled image
agree on every size).

Sizes are `(width, height)` in pixels, as PIL and diffusers' `calculate_dimensions` give them.

* **The pipelines' rule** (`calculate_dimensions`): area ≈ a target area at the image's aspect ratio,
  each side rounded to a multiple of 32. Edit resizes its one image to ≈ 1024² (`VAE_IMAGE_SIZE`)
  for both the VL processor and the VAE; Edit-Plus sends each image to the VL processor at ≈ 384²
  (`CONDITION_IMAGE_SIZE`) and to the VAE at ≈ 1024² (`plan_sizes`).
* **Output size**: by default the pipeline size of the first (Edit) or last (Edit-Plus) image;
  a given or default height / width is floored to the latent grid (`output_dims`).
* **Cache buckets** (`bucket_size`): the pipelines' rule at the cache's resolution, except that an
  image smaller than that area is never enlarged (its sides are floored to multiples of 32).
* **Pixels**: every resize is diffusers' `VaeImageProcessor.resize` (PIL Lanczos, no reducing gap);
  the VAE takes float32 `[3, H, W]` in [-1, 1] (`vae_pixels`), decoded `[B, 3, H, W]` in [-1, 1]
  comes back as float32 `[B, H, W, 3]` in [0, 1] (`to_numpy_images`) and PIL images (`numpy_to_pil`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (width, height)

MULTIPLE = 32  # the pipelines round every side to 32 (VAE factor 8 × 2×2 patches × 2)
CONDITION_IMAGE_SIZE = 384 * 384  # Edit-Plus: VL-processor input area per image
VAE_IMAGE_SIZE = 1024 * 1024  # Edit-Plus: VAE input area per image; Edit: the one image's area
VAE_SCALE_FACTOR = 8
EDIT_VARIANTS = ("edit", "edit_plus")


# ---- sizes ----------------------------------------------------------------------------------------
def calculate_dimensions(target_area: float, ratio: float) -> Size:
    """(width, height) of area ≈ `target_area` with width/height = `ratio`, each rounded to a multiple of 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / MULTIPLE) * MULTIPLE, round(height / MULTIPLE) * MULTIPLE


def floor_to(value: int, multiple: int) -> int:
    """`value` rounded down to a multiple of `multiple`."""
    return int(value) // multiple * multiple


@dataclasses.dataclass(frozen=True)
class ImageSizes:
    """The pipeline's resize plan for one prompt's images: (width, height) of each image for the VL
    processor and for the VAE, and the default output size (before flooring to the latent grid)."""

    condition: tuple[Size, ...]
    vae: tuple[Size, ...]
    output: Size


def plan_sizes(images: Sequence[Image.Image], variant: str, *, vae_area: int = VAE_IMAGE_SIZE,
               condition_area: int = CONDITION_IMAGE_SIZE) -> ImageSizes:
    """diffusers' sizing: edit — the first image's ≈ `vae_area` size for the VL processor, the VAE and the
    output; edit_plus — `condition_area` / `vae_area` per image, the output from the last image."""
    if variant not in EDIT_VARIANTS:
        raise ValueError(f"variant must be one of {EDIT_VARIANTS}, got {variant!r}")
    if not images:
        raise ValueError("the edit pipelines need an input image")
    if variant == "edit":
        size = calculate_dimensions(vae_area, images[0].width / images[0].height)
        return ImageSizes((size,) * len(images), (size,) * len(images), size)
    ratios = [im.width / im.height for im in images]
    return ImageSizes(tuple(calculate_dimensions(condition_area, r) for r in ratios),
                      tuple(calculate_dimensions(vae_area, r) for r in ratios),
                      calculate_dimensions(vae_area, ratios[-1]))


def output_dims(height: int | None, width: int | None, default: Size, multiple_of: int) -> tuple[int, int]:
    """(height, width) of the output: the given or `default` (width, height) size, floored to
    `multiple_of` (`vae_scale_factor * 2`) as diffusers does (with a warning when that changes it)."""
    out = []
    for name, value, fallback in (("height", height, default[1]), ("width", width, default[0])):
        value = fallback if value is None else value
        if not isinstance(value, (int, np.integer)) or value < multiple_of:
            raise ValueError(f"{name} must be an integer of at least {multiple_of} pixels, got {value!r}")
        floored = floor_to(value, multiple_of)
        if floored != value:
            warnings.warn(f"{name} {value} is not a multiple of {multiple_of}: using {floored} (as diffusers does)",
                          stacklevel=3)
        out.append(floored)
    return out[0], out[1]


def bucket_size(width: int, height: int, area: int, *, upscale: bool = False) -> Size:
    """(width, height) of a cached target: the pipelines' size at `area` (so a cache holds the sizes the
    pipeline generates), except that an image with less area is never enlarged unless `upscale`: its
    sides are floored to multiples of 32 instead."""
    if upscale or width * height >= area:
        return calculate_dimensions(area, width / height)
    return floor_to(width, MULTIPLE), floor_to(height, MULTIPLE)


# ---- pixels ---------------------------------------------------------------------------------------
def as_pil(image: Any) -> Image.Image:
    """A PIL image, or a uint8 `[H, W, 3|4]` array as one."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4):
        return Image.fromarray(image)
    desc = f"array {image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
    raise TypeError(f"images must be PIL images or uint8 [H, W, 3] arrays, got {desc}")


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' `VaeImageProcessor.resize` for PIL images: Lanczos, no reducing gap."""
    return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)


def condition_images(images: Sequence[Image.Image], variant: str, *,
                     condition_area: int = CONDITION_IMAGE_SIZE) -> list[Image.Image]:
    """One prompt's images as the pipeline hands them to the VL processor (resized by `plan_sizes`)."""
    sizes = plan_sizes(images, variant, condition_area=condition_area).condition
    return [resize(im, *size) for im, size in zip(images, sizes)]


def vae_pixels(image: Image.Image, size: Size) -> np.ndarray:
    """The VAE input of an image: Lanczos-resized to `size` (width, height), RGB, float32 `[3, H, W]` in
    [-1, 1] (diffusers' `VaeImageProcessor.preprocess`; non-RGB images are converted so the VAE gets 3
    channels)."""
    x = np.asarray(resize(image, *size).convert("RGB"), np.float32) / 255.0
    return np.ascontiguousarray((2.0 * x - 1.0).transpose(2, 0, 1))


def latent_mask(mask: Image.Image, size: Size) -> np.ndarray:
    """A loss mask on the latent grid: the mask image as greyscale (white 1, black 0, grey between),
    Lanczos-resized to `size` (width, height) as the target is (`vae_pixels`), then averaged over each
    `VAE_SCALE_FACTOR`² block of pixels → float32 `[H/8, W/8]` in [0, 1]."""
    w, h = size
    f = VAE_SCALE_FACTOR
    if w % f or h % f:
        raise ValueError(f"mask size {w}x{h}: sides must be multiples of {f}")
    g = np.asarray(resize(mask.convert("L"), w, h), np.float32) / 255.0
    return np.ascontiguousarray(g.reshape(h // f, f, w // f, f).mean(axis=(1, 3)), np.float32)


def to_numpy_images(images: Any) -> np.ndarray:
    """Decoded `[B, 3, H, W]` in [-1, 1] → float32 `[B, H, W, 3]` in [0, 1] (`VaeImageProcessor.postprocess`)."""
    x = np.asarray(images, np.float32)
    return np.ascontiguousarray(np.clip(x / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float `[..., H, W, 3]` in [0, 1] → uint8 with diffusers' rounding (`(x * 255).round()`)."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """float `[B, H, W, 3]` in [0, 1] → PIL images (diffusers' rounding)."""
    return [Image.fromarray(x) for x in to_uint8(images)]


__all__ = ["CONDITION_IMAGE_SIZE", "EDIT_VARIANTS", "ImageSizes", "MULTIPLE", "Size", "VAE_IMAGE_SIZE",
           "VAE_SCALE_FACTOR", "as_pil", "bucket_size", "calculate_dimensions", "condition_images", "floor_to",
           "latent_mask", "numpy_to_pil", "output_dims", "plan_sizes", "resize", "to_numpy_images", "to_uint8",
           "vae_pixels"]
