"""Validation during training: before/after edit grids through the JAX pipeline, and latent distances.

Every `validation.every` steps (and once before the first step):

* **Images** (`validation.prompts`): each prompt is sampled with its control image(s) through the
  pipeline's stages (`QwenImageEditPipeline`: the compiled sampling loop, then the VAE decoder) with
  fixed noise, so only the weights change between grids. The prompts (and negative prompts) are
  encoded once, before the DiT is loaded, and the text encoder is released right away, so it never
  shares memory with training. The VAE stays loaded (about 0.25 GB in bf16). One PNG per validation
  step, `DIR/validation/step_NNNNNN.png`: a row per prompt with its control image(s), the base
  model's edit ("before", the LoRA switched off) and the current one ("after"); the same grid goes
  to TensorBoard as `validation/grid`.
* **Distance** (`validation.samples`): RMS distance between sampled and cached target latents of
  fixed dataset examples (`sampling.validation_distance`), logged as `validation_distance`.

On a mesh both run sharded like training (the batch over the batch axes, the model as placed);
every process samples, process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, UnidentifiedImageError

from ..cache_format import CachedDataset
from ..config import as_dtype
from ..errors import CheckpointError
from ..imaging import as_pil, output_dims, to_numpy_images, to_uint8
from ..parallel import distributed
from ..pipeline import QwenImageEditPipeline, save_png
from ..sampling import QWEN_IMAGE_SCHEDULER, FlowMatchConfig, read_scheduler_config, validation_distance
from ..utils import storage
from .config import ConfigError, TrainConfig, ValidationPrompt

VALIDATION_DIR = "validation"
CELL_HEIGHT = 256  # grid cells are scaled to this height (small images enlarged, large ones reduced)
_PAD, _TEXT_H = 4, 14
_BG, _FG = (255, 255, 255), (0, 0, 0)


def validation_repo(cfg: TrainConfig) -> str:
    """The pipeline repo folder for the validation images: `validation.repo`, or the folder above
    `model.path` when it is a diffusers repo (holds `model_index.json`)."""
    v = cfg.validation
    if v.repo:
        if not os.path.isfile(os.path.join(v.repo, "model_index.json")):
            raise ConfigError(f"validation.repo={v.repo}: not a diffusers Qwen-Image-Edit repo folder "
                              f"(no model_index.json)")
        return v.repo
    if storage.is_remote(cfg.model.path):
        raise ConfigError(f"validation.prompts needs the pipeline's text encoder, VAE and processor: set validation.repo "
                          f"to a local Qwen-Image-Edit repo folder (model.path {cfg.model.path} is in a bucket)")
    parent = os.path.dirname(os.path.abspath(cfg.model.path).rstrip(os.sep))
    if os.path.isfile(os.path.join(parent, "model_index.json")):
        return parent
    raise ConfigError(f"validation.prompts needs the pipeline's text encoder, VAE and processor: set validation.repo "
                      f"to the Qwen-Image-Edit repo folder ({parent}, the folder above model.path, has no "
                      f"model_index.json)")


def validation_scheduler(cfg: TrainConfig) -> FlowMatchConfig | None:
    """`validation.scheduler_config` read and checked (None when unset); a bad file is a `ConfigError`."""
    path = cfg.validation.scheduler_config
    if path is None:
        return None
    try:
        return read_scheduler_config(path)
    except (CheckpointError, ValueError) as e:
        raise ConfigError(f"validation.scheduler_config={path}: {str(e).removeprefix(path + ': ')}") from None


def check_validation_inputs(cfg: TrainConfig) -> None:
    """Every validation input exists and reads (repo, control images, scheduler config); nothing is loaded
    or written."""
    if not cfg.validation.every:
        return
    validation_scheduler(cfg)
    if not cfg.validation.prompts:
        return
    validation_repo(cfg)
    for i, p in enumerate(cfg.validation.prompts):
        for j, path in enumerate(p.images):
            read_image(path, f"validation.prompts[{i}].images[{j}]")


def read_image(path: str, key: str) -> Image.Image:
    """An image file, fully decoded; a missing or unreadable file is a `ConfigError` naming the key."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ConfigError(f"{key}={path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{key}={path}: not a readable image ({e})") from None


@dataclasses.dataclass
class _Edit:
    """One validation prompt, encoded: what each sampling needs besides the weights."""

    prompt: str
    images: list[Image.Image]
    height: int
    width: int
    embeds: Any
    mask: Any
    negative_embeds: Any
    negative_mask: Any
    seed: int


class ValidationImages:
    """The before/after grids of `validation.prompts` (see the module docstring)."""

    def __init__(self, pipe: QwenImageEditPipeline, edits: list[_Edit], cfg: TrainConfig):
        self.pipe, self.edits, self.cfg = pipe, edits, cfg
        self.before: list[np.ndarray] | None = None

    @classmethod
    def prepare(cls, cfg: TrainConfig, mesh: Any, log: Callable[[str], None]) -> "ValidationImages":
        """Load the repo's text encoder and VAE, encode every prompt once, release the text encoder."""
        v = cfg.validation
        repo = validation_repo(cfg)
        log(f"validation: encoding {len(v.prompts)} prompt(s) with {repo}/text_encoder (released afterwards)")
        pipe = QwenImageEditPipeline.from_pretrained(repo, dtype=as_dtype(cfg.model.dtype), mesh=mesh,
                                                     components=("text_encoder", "vae"),
                                                     scheduler_config=validation_scheduler(cfg))
        pipe.vae_image_area = v.resolution * v.resolution
        edits = [_encode(pipe, p, i, cfg) for i, p in enumerate(v.prompts)]
        pipe.text_encoder = None
        gc.collect()
        return cls(pipe, edits, cfg)

    def sample(self, model: Any) -> list[np.ndarray]:
        """Each prompt's edit by `model`: uint8 `[H, W, 3]` images (every process gets them)."""
        v, pipe = self.cfg.validation, self.pipe
        pipe.transformer = model
        out = []
        try:
            for e in self.edits:
                cfg_on = e.negative_embeds is not None
                latents = pipe(image=e.images, prompt_embeds=e.embeds, prompt_embeds_mask=e.mask,
                               negative_prompt_embeds=e.negative_embeds, negative_prompt_embeds_mask=e.negative_mask,
                               true_cfg_scale=v.true_cfg_scale if cfg_on else 1.0, height=e.height, width=e.width,
                               num_inference_steps=v.num_inference_steps, seed=e.seed, output_type="latent").images
                pixels = distributed.to_host(pipe.decode_latents(latents, e.height, e.width))
                out.append(to_uint8(to_numpy_images(pixels)[0]))
        finally:
            pipe.transformer = None
        return out

    def run(self, step: int, graphdef: Any, params: Any, base: Any) -> Image.Image:
        """Sample with the current LoRA (and, the first time, with the LoRA off) → the step's grid."""
        if self.before is None:
            off = jax.tree.map(lambda x: x * 0, params)  # LoRA deltas B·A = 0: the base model
            self.before = self.sample(nnx.merge(graphdef, off, base))
        after = None if step == 0 else self.sample(nnx.merge(graphdef, params, base))
        return edit_grid(self.edits, self.before, after, step)


def _encode(pipe: QwenImageEditPipeline, p: ValidationPrompt, i: int, cfg: TrainConfig) -> _Edit:
    v = cfg.validation
    key = f"validation.prompts[{i}]"
    images = [read_image(path, f"{key}.images[{j}]") for j, path in enumerate(p.images)]
    try:
        sizes = pipe.image_sizes(images)
        height, width = output_dims(None, None, sizes.output, 2 * pipe.vae_scale_factor)
        embeds, mask = pipe.encode_prompt(p.prompt, images)
        neg = neg_mask = None
        if v.true_cfg_scale > 1:
            negative = v.negative_prompt if p.negative_prompt is None else p.negative_prompt
            neg, neg_mask = pipe.encode_prompt(negative, images)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    return _Edit(p.prompt, images, height, width, embeds, mask, neg, neg_mask, v.seed + i)


# ---- the grid ------------------------------------------------------------------------------------
def _cell(image: Image.Image | np.ndarray, height: int = CELL_HEIGHT) -> Image.Image:
    im = as_pil(image).convert("RGB")
    width = max(1, round(im.width * height / im.height))
    return im.resize((width, height), Image.NEAREST if height >= im.height else Image.LANCZOS)


def edit_grid(edits: Sequence[_Edit], before: Sequence[np.ndarray], after: Sequence[np.ndarray] | None,
              step: int) -> Image.Image:
    """Rows: a prompt line, then its control image(s) | before | after (no "after" at step 0)."""
    rows = []
    for i, e in enumerate(edits):
        cells = [_cell(im) for im in e.images] + [_cell(before[i])] + ([] if after is None else [_cell(after[i])])
        labels = [f"input {j + 1}" for j in range(len(e.images))] + ["before (base)"] + \
            ([] if after is None else [f"after (step {step})"])
        rows.append((e.prompt, cells, labels))
    width = max(sum(c.width for c in cells) + _PAD * (len(cells) + 1) for _, cells, _ in rows)
    height = sum(2 * _TEXT_H + CELL_HEIGHT + 2 * _PAD for _ in rows) + _TEXT_H + _PAD
    grid = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(grid)
    draw.text((_PAD, _PAD), f"step {step}", fill=_FG)
    y = _TEXT_H + _PAD
    for prompt, cells, labels in rows:
        draw.text((_PAD, y + 2), _fit(draw, prompt, width - 2 * _PAD), fill=_FG)
        y += _TEXT_H
        x = _PAD
        for cell, label in zip(cells, labels):
            draw.text((x, y + 1), _fit(draw, label, cell.width), fill=_FG)
            grid.paste(cell, (x, y + _TEXT_H))
            x += cell.width + _PAD
        y += _TEXT_H + CELL_HEIGHT + 2 * _PAD
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text` cut (with "…") to fit `width` pixels in the default font."""
    text = " ".join(text.split())
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


# ---- both kinds, as the loop calls them ----------------------------------------------------------------
class Validation:
    """What the training loop calls at step 0 and every `validation.every` steps."""

    def __init__(self, cfg: TrainConfig, images: ValidationImages | None, dataset: CachedDataset, graphdef: Any,
                 mesh: Any, output_dir: str, write: bool):
        v = cfg.validation
        for i in v.samples:
            if not 0 <= i < len(dataset):
                raise ConfigError(f"validation.samples: index {i} is outside the dataset's {len(dataset)} samples")
        self.cfg, self.images, self.graphdef, self.mesh, self.write = cfg, images, graphdef, mesh, write
        self.samples = [dataset[i] for i in v.samples]
        self.scheduler = validation_scheduler(cfg) or QWEN_IMAGE_SCHEDULER
        self.folder = storage.join(output_dir, VALIDATION_DIR)

    def __call__(self, step: int, params: Any, base: Any) -> tuple[dict[str, Any], Image.Image | None, str | None]:
        """(metrics, grid image or None, its PNG path or None) for `step`."""
        v, metrics, grid, path = self.cfg.validation, {}, None, None
        if self.samples:
            model = nnx.merge(self.graphdef, params, base)
            d = [validation_distance(model, s, num_inference_steps=v.num_inference_steps, seed=v.seed,
                                     true_cfg_scale=v.true_cfg_scale, mesh=self.mesh, scheduler=self.scheduler)
                 for s in self.samples]
            metrics = {"validation_distance": float(np.mean(d)), "validation_per_sample": d}
        if self.images is not None:
            grid = self.images.run(step, self.graphdef, params, base)
            path = storage.join(self.folder, f"step_{step:06d}.png")
            if self.write:
                save_png(path, grid, {"step": step, "prompts": " | ".join(e.prompt for e in self.images.edits)},
                         overwrite=True)
        return metrics, grid, path


__all__ = ["CELL_HEIGHT", "VALIDATION_DIR", "Validation", "ValidationImages", "check_validation_inputs", "edit_grid",
           "read_image", "validation_repo", "validation_scheduler"]
