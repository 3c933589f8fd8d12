"""QwenImageProcessor vs transformers' Qwen2VLImageProcessorPil (the PIL backend): bit-exact."""

import json
import random

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil  # noqa: E402

from qwen_edit_jax.preprocess import ImageProcessorConfig, QwenImageProcessor, smart_resize  # noqa: E402

# processor/preprocessor_config.json as released with Qwen2.5-VL-7B-Instruct / Qwen-Image-Edit.
QWEN_IMAGE_CONFIG = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def make_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(-40, 41, (h, w, 3))
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")
    return Image.fromarray(rgb, "RGB").convert(mode)


CASES = [(37, 53, "RGB"), (8, 8, "RGB"), (1, 30, "RGB"), (640, 96, "RGB"), (97, 611, "RGB"), (300, 200, "RGBA"),
         (129, 77, "L"), (224, 224, "P"), (250, 183, "LA"), (1000, 20, "RGB"), (448, 448, "RGB")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processor")
    (folder / "preprocessor_config.json").write_text(json.dumps(QWEN_IMAGE_CONFIG))
    return folder


@pytest.mark.parametrize("kwargs", [{}, {"min_pixels": 3136, "max_pixels": 12845056},
                                    {"size": {"shortest_edge": 4 * 28 * 28, "longest_edge": 64 * 28 * 28}}],
                         ids=["class-defaults", "qwen-image", "size-dict"])
def test_pixel_values_exact(kwargs):
    ref = hf_pil.Qwen2VLImageProcessorPil(**kwargs)
    ours = QwenImageProcessor(ImageProcessorConfig.from_dict(kwargs))
    images = [make_image(w, h, mode, i) for i, (w, h, mode) in enumerate(CASES)]
    for image in images:  # one at a time and as one batch
        want, got = ref(image, return_tensors="np"), ours(image)
        assert got.pixel_values.dtype == np.float32 and got.pixel_values.shape == want["pixel_values"].shape
        np.testing.assert_array_equal(got.pixel_values, want["pixel_values"])
        np.testing.assert_array_equal(got.image_grid_thw, want["image_grid_thw"])
    want, got = ref(images, return_tensors="np"), ours(images)
    np.testing.assert_array_equal(got.pixel_values, want["pixel_values"])
    np.testing.assert_array_equal(got.image_grid_thw, want["image_grid_thw"])
    for image in images:
        n = ref.get_number_of_image_patches(image.height, image.width)
        assert ours.num_image_tokens(image.height, image.width) * 4 == n


def test_from_folder_matches_auto_image_processor(folder):
    ref = transformers.AutoImageProcessor.from_pretrained(folder)
    # transformers 5 picks the torchvision backend when torchvision is installed, PIL otherwise; we match PIL.
    ref = ref if isinstance(ref, hf_pil.Qwen2VLImageProcessorPil) else transformers.AutoImageProcessor.from_pretrained(
        folder, backend="pil")
    ours = QwenImageProcessor.from_folder(folder)
    assert (ours.config.min_pixels, ours.config.max_pixels) == (3136, 12845056)
    image = make_image(333, 250, "RGB", 7)
    want, got = ref(image, return_tensors="np"), ours(image)
    np.testing.assert_array_equal(got.pixel_values, want["pixel_values"])
    np.testing.assert_array_equal(got.image_grid_thw, want["image_grid_thw"])


def test_smart_resize_matches_and_token_table():
    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError):
                smart_resize(h, w)
            continue
        for lo, hi in ((3136, 12845056), (56 * 56, 28 * 28 * 1280), (4 * 784, 16 * 784)):
            assert smart_resize(h, w, 28, lo, hi) == hf_pil.smart_resize(h, w, 28, lo, hi)
    # encoders.md §3.4, with the released min/max pixels: (VL input size, image tokens)
    proc = QwenImageProcessor(ImageProcessorConfig.from_dict(QWEN_IMAGE_CONFIG))
    for (w, h), (rw, rh), tokens in [((1024, 1024), (1036, 1036), 1369), ((1184, 896), (1176, 896), 1344),
                                     ((1376, 768), (1372, 756), 1323), ((384, 384), (392, 392), 196),
                                     ((512, 288), (504, 280), 180)]:
        assert proc.resized_size(h, w) == (rh, rw)
        assert proc.num_image_tokens(h, w) == tokens
