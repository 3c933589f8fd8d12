"""Tokenizer + image processor joined as transformers' `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` (v5).

The processor first processes the images, then replaces the i-th `<|image_pad|>` in the texts (counted
across the whole batch, in order) by `grid_t*grid_h*grid_w / merge_size**2` copies of itself, then
tokenizes the expanded texts with the tokenizer's padding, and marks image tokens in
`mm_token_type_ids` (1 = image, 0 = text). The language model needs `mm_token_type_ids` for its 3D
M-RoPE positions (see encoders.md §3.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .image_processor import QwenImageProcessor
from .tokenizer import IMAGE_TOKEN, QwenTokenizer


@dataclass(frozen=True)
class ProcessorOutput:
    """What `Qwen2VLProcessor(text=..., images=..., padding=True)` returns, as numpy.

    input_ids, attention_mask, mm_token_type_ids: int32 `[B, L]`; pixel_values: float32 `[N, 1176]`
    and image_grid_thw: int32 `[num_images, 3]`, both None without images.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    mm_token_type_ids: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None


def expand_image_tokens(texts: Sequence[str], tokens_per_image: Sequence[int],
                        image_token: str = IMAGE_TOKEN) -> list[str]:
    """Replace the i-th `image_token` over the batch by `tokens_per_image[i]` copies of it."""
    found = sum(t.count(image_token) for t in texts)
    if found != len(tokens_per_image):
        raise ValueError(f"the texts hold {found} {image_token} tokens but {len(tokens_per_image)} images were given")
    counts = iter(tokens_per_image)
    return [_expand_one(t, image_token, counts) for t in texts]


def _expand_one(text: str, image_token: str, counts) -> str:
    """Expand each `image_token` of one text by the next count."""
    parts = text.split(image_token)
    return parts[0] + "".join(image_token * next(counts) + part for part in parts[1:])


class QwenVLProcessor:
    """Qwen2.5-VL processor: `QwenTokenizer` + `QwenImageProcessor` from one folder (`processor/`)."""

    def __init__(self, tokenizer: QwenTokenizer, image_processor: QwenImageProcessor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_folder(cls, folder: str | Path) -> QwenVLProcessor:
        """Tokenizer files and `preprocessor_config.json` from one folder, as diffusers' `processor/`."""
        return cls(QwenTokenizer.from_folder(folder), QwenImageProcessor.from_folder(folder))

    def __call__(self, texts: str | Sequence[str], images: Image.Image | Sequence[Image.Image] | None = None, *,
                 padding: bool | str = True, truncation: bool = False, max_length: int | None = None,
                 pad_to_multiple_of: int | None = None) -> ProcessorOutput:
        """`Qwen2VLProcessor(text=texts, images=images, padding=..., ...)` as numpy."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        images = [images] if isinstance(images, (Image.Image, np.ndarray)) else list(images or [])
        pixel_values = grid = None
        if images:
            out = self.image_processor(images)
            pixel_values, grid = out.pixel_values, out.image_grid_thw
            merge = self.image_processor.merge_size ** 2
            texts = expand_image_tokens(texts, [int(np.prod(g)) // merge for g in grid])
        elif any(IMAGE_TOKEN in t for t in texts):
            raise ValueError(f"the texts hold {IMAGE_TOKEN} tokens but no images were given")
        enc = self.tokenizer(texts, padding=padding, truncation=truncation, max_length=max_length,
                             pad_to_multiple_of=pad_to_multiple_of)
        mm = (enc.input_ids == self.tokenizer.image_token_id).astype(np.int32)
        return ProcessorOutput(enc.input_ids, enc.attention_mask, mm, pixel_values, grid)
