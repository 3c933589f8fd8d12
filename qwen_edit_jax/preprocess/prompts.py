"""Prompt templates and text-encoder inputs of the Qwen-Image pipelines (diffusers 0.42.1).

Three variants, as the diffusers pipelines build the text-encoder input:
* "t2i"       `QwenImagePipeline`: its own system prompt, no image, the tokenizer truncates at
              1024 + 34 tokens, the first 34 tokens are dropped, embeddings cut to `max_sequence_length`.
* "edit"      `QwenImageEditPipeline`: one image per prompt in the template
              (`<|vision_start|><|image_pad|><|vision_end|>` before the prompt), drop 64. The image is
              first resized to ≈ 1024² (`imaging.plan_sizes`); that same image goes to the VL processor
              (which resizes again) and to the VAE.
* "edit_plus" `QwenImageEditPlusPipeline` (2509/2511): "Picture i: <|vision_start|><|image_pad|>
              <|vision_end|>" per image before the prompt, drop 64. Each image goes to the VL processor
              at a 384*384 area and to the VAE at 1024*1024 (`imaging.plan_sizes`).
The dropped prefix is exactly the system prompt and the user header with the real tokenizer.

Batches: diffusers' edit pipelines take one image set for the whole call (Edit-Plus refuses batch > 1);
here every prompt has its own images, and each row equals diffusers run on that prompt alone (the
padded rows do not change the valid tokens: right padding, causal attention, masked positions).
One diffusers quirk is not copied: `QwenImageEditPipeline` given a *list* of images skips its 1 Mpx
resize (`VaeImageProcessor.resize` returns lists unchanged); we always resize, as for a single image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from ..imaging import as_pil, condition_images
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


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def format_prompt(prompt: str, variant: Variant, num_images: int = 0) -> str:
    """The templated text the pipeline tokenizes for one prompt with `num_images` images."""
    _check_variant(variant)
    if variant == "edit_plus":
        prompt = "".join(EDIT_PLUS_IMAGE_TEMPLATE.format(i + 1) for i in range(num_images)) + prompt
    return TEMPLATES[variant].template.format(prompt)


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
    return [[as_pil(im) for im in x] for x in per_prompt]


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
        per_prompt = [condition_images(x, variant) if x else x for x in per_prompt]
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
