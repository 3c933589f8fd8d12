"""Qwen2-VL image preprocessing in numpy/PIL, equal to transformers' `Qwen2VLImageProcessorPil` (v5).

Which transformers class this matches: in transformers 5 `AutoImageProcessor` picks the torchvision
backend (`Qwen2VLImageProcessor`, torch resize) when torchvision is installed and the PIL backend
(`Qwen2VLImageProcessorPil`) otherwise; `use_fast` is deprecated and maps to backend="torchvision"/"pil".
We match the PIL backend, which is also what the slow transformers-4.x processor did when Qwen-Image was
trained: PIL bicubic resize on uint8, then float math in numpy.

Steps per image: convert to RGB (alpha composited onto white), `smart_resize` to multiples of
patch_size*merge_size (28) within [min_pixels, max_pixels], PIL resize (bicubic), rescale in float64
then float32, normalize with the OpenAI CLIP mean/std in float32, and patchify to rows of
`3 * temporal_patch_size * patch_size**2` (1176) values, ordered (merge-block row, merge-block col,
row in block, col in block) so each 2x2 merge cell is 4 consecutive rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of `preprocessor_config.json` the Qwen2-VL processor uses (class defaults otherwise)."""

    min_pixels: int = 56 * 56  # size["shortest_edge"]
    max_pixels: int = 28 * 28 * 1280  # size["longest_edge"]
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    do_resize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        """As transformers' `__init__`: `size` {shortest_edge, longest_edge}, overridden by min/max_pixels."""
        size = d.get("size") or {}
        scalars = ("patch_size", "temporal_patch_size", "merge_size", "do_resize", "resample", "do_rescale",
                   "rescale_factor", "do_normalize", "do_convert_rgb")
        kw = {k: d[k] for k in scalars if d.get(k) is not None}
        kw.update({k: tuple(d[k]) for k in ("image_mean", "image_std") if d.get(k) is not None})
        min_pixels = d.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels
        max_pixels = d.get("max_pixels") or size.get("longest_edge") or cls.max_pixels
        return cls(min_pixels=int(min_pixels), max_pixels=int(max_pixels), **kw)

    @classmethod
    def from_file(cls, path: str | Path) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` (a file or the folder holding it)."""
        path = Path(path)
        path = path / "preprocessor_config.json" if path.is_dir() else path
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, rescaled into [min_pixels, max_pixels], ratio kept."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """RGB PIL image; transparency is composited onto white (transformers' `convert_to_rgb`)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """`[C, H, W]` → `[grid_h * grid_w, C * T * p * p]`, the single frame repeated over T temporal steps.

    Rows run over (H/(m*p), W/(m*p), m, m): the 2x2 patches of one merge cell are consecutive. Each row
    is flattened as (C, T, p, p).
    """
    c, h, w = image.shape
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # gh/m gw/m m m C p p
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return x.reshape(gh * gw, c * temporal_patch_size * p * p)


@dataclass(frozen=True)
class ImageInputs:
    """`pixel_values` `[sum N_i, 1176]` float32 and `image_grid_thw` `[num_images, 3]` int32 (t, h, w patches)."""

    pixel_values: np.ndarray
    image_grid_thw: np.ndarray


class QwenImageProcessor:
    """Qwen2-VL image processor (PIL backend semantics) over `ImageProcessorConfig`."""

    def __init__(self, config: ImageProcessorConfig | None = None):
        self.config = config or ImageProcessorConfig()

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> QwenImageProcessor:
        """Load `processor/preprocessor_config.json`; keyword overrides replace config fields."""
        return cls(replace(ImageProcessorConfig.from_file(folder), **overrides))

    @property
    def merge_size(self) -> int:
        return self.config.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size the processor resizes a `height` x `width` image to."""
        c = self.config
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels) if c.do_resize else (height, width)

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of a `height` x `width` image."""
        h, w = self.resized_size(height, width)
        return 1, h // self.config.patch_size, w // self.config.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """`<|image_pad|>` tokens for one image: t*h*w / merge_size**2 (what the processor expands)."""
        t, h, w = self.grid_thw(height, width)
        return t * h * w // self.config.merge_size ** 2

    def pixels(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One image → normalized float32 `[3, H', W']` at the smart-resized size."""
        c = self.config
        img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        img = to_rgb(img) if c.do_convert_rgb else img
        if c.do_resize:
            h, w = self.resized_size(img.height, img.width)
            img = img.resize((w, h), resample=Image.Resampling(c.resample))
        x = np.asarray(img)
        x = x[:, :, None] if x.ndim == 2 else x
        x = np.moveaxis(x, -1, 0)
        if c.do_rescale:
            x = (x.astype(np.float64) * c.rescale_factor).astype(np.float32)
        if c.do_normalize:
            x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
            mean = np.asarray(c.image_mean, dtype=x.dtype)[:, None, None]
            std = np.asarray(c.image_std, dtype=x.dtype)[:, None, None]
            x = (x - mean) / std
        return np.asarray(x, dtype=np.float32)

    def __call__(self, images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray]) -> ImageInputs:
        """Process images (one or a flat list) into concatenated patches and their grids."""
        images = [images] if isinstance(images, (Image.Image, np.ndarray)) else list(images)
        c = self.config
        patches, grids = [], []
        for image in images:
            x = self.pixels(image)
            patches.append(patchify(x, c.patch_size, c.merge_size, c.temporal_patch_size))
            grids.append((1, x.shape[1] // c.patch_size, x.shape[2] // c.patch_size))
        return ImageInputs(np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int32).reshape(-1, 3))
