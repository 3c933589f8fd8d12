"""Prompt templates and condition-image sizing of the Qwen-Image pipelines (diffusers 0.42.1).

Three variants, as the diffusers pipelines build the text-encoder input:
* "t2i"       `QwenImagePipeline`: its own system prompt, no image, the tokenizer truncates at
              1024 + 34 tokens, the first 34 tokens are dropped, embeddings cut to `max_sequence_length`.
* "edit"      `QwenImageEditPipeline`: one image per prompt in the template
              (`<|vision_start|><|image_pad|><|vision_end|>` before the prompt), drop 64. The image is
              first resized (PIL Lanczos) to `calculate_dimensions(1024*1024, w/h)`; that same image
              goes to the VL processor (which resizes again) and to the VAE.
* "edit_plus" `QwenImageEditPlusPipeline` (2509/2511): "Picture i: <|vision_start|><|image_pad|>
              <|vision_end|>" per image before the prompt, drop 64. Each image goes to the VL processor
              at a 384*384 area (`CONDITION_IMAGE_SIZE`) and to the VAE at 1024*1024 (`VAE_IMAGE_SIZE`).
The dropped prefix is exactly the system prompt and the user header with the real tokenizer.

Batches: diffusers' edit pipelines take one image set for the whole call (Edit-Plus refuses batch > 1);
here every prompt has its own images, and each row equals diffusers run on that prompt alone (the
padded rows do not change the valid tokens: right padding, causal attention, masked positions).
One diffusers quirk is not copied: `QwenImageEditPipeline` given a *list* of images skips its 1 Mpx
resize (`VaeImageProcessor.resize` returns lists unchanged); we always resize, as for a single image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from .processor import QwenVLProcessor

Variant = Literal["t2i", "edit", "edit_plus"]
VARIANTS: tuple[str, ...] = ("t2i", "edit", "edit_plus")

T2I_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
              "of the objects and background:")
EDIT_SYSTEM = ("Describe the key features of the input image (color, shape, size, texture, objects, background), then "
               "explain how the user's text instruction should alter or modify the image. Generate a new image that "
               "meets the user's requirements while maintaining consistency with the original input where "
               "appropriate.")
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _chat(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class PromptTemplate:
    """A pipeline's `prompt_template_encode` ("{}" = the prompt) and `prompt_template_encode_start_idx`."""

    template: str
    drop_idx: int


TEMPLATES: dict[str, PromptTemplate] = {
    "t2i": PromptTemplate(_chat(T2I_SYSTEM, "{}"), 34),
    "edit": PromptTemplate(_chat(EDIT_SYSTEM, VISION_PLACEHOLDER + "{}"), 64),
    "edit_plus": PromptTemplate(_chat(EDIT_SYSTEM, "{}"), 64),
}
EDIT_PLUS_IMAGE_TEMPLATE = "Picture {}: " + VISION_PLACEHOLDER
TOKENIZER_MAX_LENGTH = 1024  # pipelines' tokenizer_max_length; also the max_sequence_length bound
CONDITION_IMAGE_SIZE = 384 * 384  # Edit-Plus: VL-processor input area per image
VAE_IMAGE_SIZE = 1024 * 1024  # Edit-Plus: VAE input area per image; Edit: the one image's area
VAE_SCALE_FACTOR = 8


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def format_prompt(prompt: str, variant: Variant, num_images: int = 0) -> str:
    """The templated text the pipeline tokenizes for one prompt with `num_images` images."""
    _check_variant(variant)
    if variant == "edit_plus":
        prompt = "".join(EDIT_PLUS_IMAGE_TEMPLATE.format(i + 1) for i in range(num_images)) + prompt
    return TEMPLATES[variant].template.format(prompt)


# --- image sizing ---------------------------------------------------------------------------------
def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """(width, height) of area ≈ `target_area` with width/height = `ratio`, each rounded to a multiple of 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' `VaeImageProcessor.resize` for PIL images: Lanczos, no reducing gap."""
    return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)


def condition_image_size(image: Image.Image, variant: Variant) -> tuple[int, int]:
    """(width, height) the pipeline resizes an image to before the VL processor."""
    _check_variant(variant)
    if variant == "t2i":
        raise ValueError("the t2i variant takes no images")
    area = VAE_IMAGE_SIZE if variant == "edit" else CONDITION_IMAGE_SIZE
    return calculate_dimensions(area, image.width / image.height)


def vae_image_size(image: Image.Image, variant: Variant) -> tuple[int, int]:
    """(width, height) of the image the pipeline hands to the VAE (≈ 1 Mpx, multiples of 32)."""
    _check_variant(variant)
    return calculate_dimensions(VAE_IMAGE_SIZE, image.width / image.height)


def condition_image(image: Image.Image, variant: Variant) -> Image.Image:
    """The image as the pipeline passes it to the VL processor (Lanczos-resized; see module docstring)."""
    return resize(image, *condition_image_size(image, variant))


def vae_image(image: Image.Image, variant: Variant) -> np.ndarray:
    """The VAE input: float32 `[3, H, W]` in [-1, 1] (`VaeImageProcessor.preprocess` of the pipeline).

    Edit resizes the condition image again to the same size (a no-op); Edit-Plus resizes the original.
    diffusers does not convert to RGB here; non-RGB images are converted so the VAE gets 3 channels.
    """
    x = np.array(resize(image, *vae_image_size(image, variant)).convert("RGB")).astype(np.float32) / 255.0
    return np.ascontiguousarray((2.0 * x - 1.0).transpose(2, 0, 1))


def output_size(images: Sequence[Image.Image], variant: Variant,
                multiple_of: int = 2 * VAE_SCALE_FACTOR) -> tuple[int, int]:
    """Default (width, height) of the generated image: ≈ 1 Mpx at the ratio of the first (Edit) or last
    (Edit-Plus) image, floored to `multiple_of` (vae_scale_factor * 2)."""
    ref = images[0] if variant == "edit" else images[-1]
    w, h = calculate_dimensions(VAE_IMAGE_SIZE, ref.width / ref.height)
    return w // multiple_of * multiple_of, h // multiple_of * multiple_of


# --- text-encoder inputs --------------------------------------------------------------------------
@dataclass(frozen=True)
class TextEncoderInputs:
    """Everything the Qwen2.5-VL encoder and the post-processing need for one batch.

    input_ids, attention_mask, mm_token_type_ids: int32 `[B, L]`; pixel_values float32 `[N, 1176]` and
    image_grid_thw int32 `[num_images, 3]` (images of all rows, in row order) or None; images_per_row:
    how many images each row holds; drop_idx: tokens dropped from the front of each row's valid tokens.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    mm_token_type_ids: np.ndarray
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray | None
    images_per_row: tuple[int, ...]
    drop_idx: int
    variant: str


def _is_image(x) -> bool:
    """One image (PIL or uint8 array), as opposed to a list of images."""
    return isinstance(x, (Image.Image, np.ndarray))


def _images_per_prompt(images, variant: str, batch: int) -> list[list[Image.Image]]:
    """Normalise `images` to one list per prompt and check the counts the variant allows."""
    if variant == "t2i" or (variant == "edit_plus" and images is None):
        if images is not None:
            raise ValueError("the t2i variant takes no images")
        return [[] for _ in range(batch)]
    images = [images] if _is_image(images) else list(images or [])
    if variant == "edit_plus" and batch == 1 and all(_is_image(x) for x in images):
        images = [images]  # one prompt: a flat list is that prompt's images
    per_prompt = [[x] if _is_image(x) else list(x) for x in images]
    if len(per_prompt) != batch:
        raise ValueError(f"{batch} prompts but images for {len(per_prompt)}")
    if variant == "edit" and any(len(x) != 1 for x in per_prompt):
        raise ValueError(f"the edit variant takes exactly one image per prompt, got {[len(x) for x in per_prompt]}")
    return [[Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in x] for x in per_prompt]


def build_inputs(processor: QwenVLProcessor, prompts: str | Sequence[str], images=None, variant: Variant = "edit", *,
                 resize_images: bool = True, pad_to_multiple_of: int | None = None) -> TextEncoderInputs:
    """Template, resize, process and tokenize as the pipeline's `_get_qwen_prompt_embeds` does.

    images: "edit": one image per prompt (a list of B images, or one image for one prompt); "edit_plus":
    a list of images per prompt (for one prompt a flat list is accepted); "t2i": None.
    resize_images=False skips the pipeline's own resize (images already at the condition size).
    For t2i pass the processor built on `tokenizer/`; for the edit variants the one on `processor/`
    (the folders diffusers reads for each).
    """
    _check_variant(variant)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    per_prompt = _images_per_prompt(images, variant, len(prompts))
    if resize_images and variant != "t2i":
        per_prompt = [[condition_image(im, variant) for im in x] for x in per_prompt]
    texts = [format_prompt(p, variant, len(x)) for p, x in zip(prompts, per_prompt)]
    drop_idx = TEMPLATES[variant].drop_idx
    flat = [im for x in per_prompt for im in x]
    if variant == "t2i":  # QwenImagePipeline calls the tokenizer with truncation at 1024 + drop_idx
        out = processor(texts, None, truncation=True, max_length=TOKENIZER_MAX_LENGTH + drop_idx,
                        pad_to_multiple_of=pad_to_multiple_of)
    else:
        out = processor(texts, flat or None, pad_to_multiple_of=pad_to_multiple_of)
    return TextEncoderInputs(out.input_ids, out.attention_mask, out.mm_token_type_ids, out.pixel_values,
                             out.image_grid_thw, tuple(len(x) for x in per_prompt), drop_idx, variant)
