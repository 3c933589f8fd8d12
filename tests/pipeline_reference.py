"""Tiny random Qwen-Image-Edit repos in diffusers layout, and diffusers' real pipelines on them (torch, fp32).

`build_parts(root)` writes the parts every variant shares — `text_encoder/` (random tiny
Qwen2.5-VL, `save_pretrained`), `tokenizer/` + `processor/` (the tiny tokenizer of
`testing/tokenizer.py`, small pixel bounds), `vae/` (random tiny `AutoencoderKLQwenImage` with
z_dim 16 and the released spatial factor 8), `scheduler/` (the released config) — and
`make_repo(parts, folder, variant)` adds `transformer/` (random tiny DiT; `zero_cond_t` for "2511")
and `model_index.json`, linking the shared folders.

`reference_pipeline(parts, repo)` is diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`
on the same torch modules, with the text encoder called as it was trained (`mm_token_type_ids`
added to the pipeline's call: the M-RoPE fix, diffusers #14194). `small_areas(monkeypatch, …)`
shrinks diffusers' 1024² / 384² sizing areas so the tests' images stay tiny (ours: the pipeline's
`vae_image_area` / `condition_image_area`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import numpy as np
from PIL import Image

from qwen_edit_jax.config import preset
from qwen_edit_jax.testing.repo import SCHEDULER_CONFIG, write_model_index
from qwen_edit_jax.testing.tokenizer import write_tiny_processor
from qwen_edit_jax.testing.vae import TINY_VAE
from tests import text_encoder_reference as TE
from tests import vae_reference as V
from tests.sampling_reference import make_scheduler
from tests.torch_reference import make_torch_model, save_torch_model

# Small VL-processor bounds: a 128×96 image becomes 140×84 → 10×6 patches (two partial windows)
IMAGE_CONFIG = {"min_pixels": 56 * 56, "max_pixels": 224 * 224, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}
TEXT_VISION = dict(depth=2, fullatt_block_indexes=[1])
# z_dim 16 (the DiT packs 16 channels into 64 features) and three downsamples: vae_scale_factor 8
_rng = np.random.default_rng(5)
VAE_CONFIG = dict(**TINY_VAE, latents_mean=[round(float(v), 3) for v in _rng.normal(0, 0.5, 16)],
                  latents_std=[round(float(v), 3) for v in _rng.uniform(0.5, 2.0, 16)])
DIT = preset("tiny")  # joint_attention_dim 64 = the tiny text encoder's hidden size
PIPELINE_VARIANT = {"edit": "edit", "edit_plus": "edit_plus", "2511": "edit_plus"}  # 2511 is an Edit-Plus repo
SHARED = ("text_encoder", "tokenizer", "processor", "vae", "scheduler")
# the tests' sizing areas instead of diffusers' 1024² (VAE, output) and 384² (Edit-Plus VL input)
VAE_AREA, CONDITION_AREA = 128 * 96, 112 * 112


def _processor_class():
    import transformers

    class _RefProcessor(transformers.Qwen2VLProcessor):
        """Qwen2VLProcessor without a video processor (that needs torchvision); images only."""

        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    return _RefProcessor


def trained_positions(model, image_token_id: int):
    """Make `model` add `mm_token_type_ids` (1 at `<|image_pad|>`) to every call: 3D M-RoPE, as trained."""
    forward = model.forward

    def patched(*args, input_ids=None, **kwargs):
        kwargs.setdefault("mm_token_type_ids", (input_ids == image_token_id).long())
        return forward(*args, input_ids=input_ids, **kwargs)

    model.forward = patched
    return model


def build_parts(root) -> SimpleNamespace:
    """The shared folders under `root` and their torch modules (text encoder patched, tokenizer, processor, VAE)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    root = os.fspath(root)
    vocab = write_tiny_processor(root, IMAGE_CONFIG)
    ids = vocab.token_ids
    text_encoder = TE.make_torch_model(seed=3, text=dict(vocab_size=vocab.vocab_size), vision=TEXT_VISION,
                                       token_ids=ids)
    text_encoder.save_pretrained(os.path.join(root, "text_encoder"))
    vae = V.torch_vae(VAE_CONFIG, seed=4)
    vae.save_pretrained(os.path.join(root, "vae"))
    os.makedirs(os.path.join(root, "scheduler"))
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=1)
    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    processor = _processor_class()(image_processor=Qwen2VLImageProcessorPil(**{k: IMAGE_CONFIG[k] for k in (
        "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")}), tokenizer=tokenizer,
        video_processor=None)
    return SimpleNamespace(root=root, text_encoder=trained_positions(text_encoder, ids["image_token_id"]), vae=vae,
                           tokenizer=tokenizer, processor=processor)


def make_repo(parts: SimpleNamespace, folder, variant: str, seed: int = 11) -> SimpleNamespace:
    """A repo folder for "edit", "edit_plus" or "2511" (zero_cond_t) sharing `parts`; with its torch DiT."""
    folder = os.fspath(folder)
    os.makedirs(folder)
    for name in SHARED:
        os.symlink(os.path.join(parts.root, name), os.path.join(folder, name))
    cfg = dit_config(variant)
    transformer = make_torch_model(cfg, seed=seed)
    save_torch_model(transformer, os.path.join(folder, "transformer"))
    write_model_index(folder, PIPELINE_VARIANT[variant], transformer=True, scheduler=True)
    return SimpleNamespace(root=folder, variant=variant, transformer=transformer)


def dit_config(variant: str):
    """The tiny DiT config; Edit-2511 sets `zero_cond_t`."""
    return dataclasses.replace(DIT, zero_cond_t=variant == "2511")


def reference_pipeline(parts: SimpleNamespace, repo: SimpleNamespace, scheduler=None):
    """diffusers' own pipeline class for the variant, on the same torch modules (fp32, CPU); `scheduler`:
    a FlowMatchEulerDiscreteScheduler instead of the released config's."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as hf_edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as hf_plus

    cls = hf_edit.QwenImageEditPipeline if repo.variant == "edit" else hf_plus.QwenImageEditPlusPipeline
    pipe = cls(scheduler=scheduler or make_scheduler(), vae=parts.vae, text_encoder=parts.text_encoder,
               tokenizer=parts.tokenizer,
               processor=parts.processor, transformer=repo.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def small_areas(monkeypatch, vae_area: int = VAE_AREA, condition_area: int = CONDITION_AREA) -> None:
    """Make diffusers' pipelines size images for `vae_area` (their 1024²) and `condition_area` (384²)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as hf_edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as hf_plus

    areas = {1024 * 1024: vae_area, 384 * 384: condition_area}
    for module in (hf_edit, hf_plus):
        real = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, real=real: real(areas.get(area, area), ratio))


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB image (a few blobs; pure noise would make resampling dominate)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.zeros((height, width, 3))
    for _ in range(4):
        c, s = rng.uniform(0, 1, 2), rng.uniform(0.1, 0.4)
        img += rng.uniform(-1, 1, 3) * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / (2 * s * s))[..., None]
    img = (img - img.min()) / (img.max() - img.min())
    return Image.fromarray((255 * img).round().astype(np.uint8))
