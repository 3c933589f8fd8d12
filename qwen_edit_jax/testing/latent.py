"""The latent demo's inputs: a random tiny Qwen-Image-Edit-shaped checkpoint and a synthetic cache of latents.

The dataset's edit is a learnable rule. Each of `num_edits` instructions has its own prompt (a
fixed random token sequence, cut to a random length, plus a little noise) and its own per-token
channel map: target[c] = sign_k[c] · reference[perm_k[c]] + offset_k[c]. Reference latents are
smooth random fields. Predicting the target therefore needs the instruction (text tokens) and
the reference (the same position in the second image), exactly what the edit model attends to.

`write_latent_demo(folder)` writes both, `folder/tiny-dit` and `folder/cache`, the paths
`train/configs/latent_demo.yaml` reads (with `folder` = `demo_data/latent`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..config import DiTConfig, preset
from ..loading import save_transformer
from ..models.dit import init_transformer
from ..cache_format import CachedSample, write_cache
from ..utils.files import atomic_path
from .manifest import mark_finished, reuse

MODEL_DIR, CACHE_DIR = "tiny-dit", "cache"  # inside the folder `write_latent_demo` writes


@dataclasses.dataclass(frozen=True)
class LatentDemo:
    """How the latent demo's inputs are drawn; the defaults are what `train/configs/latent_demo.yaml` trains on."""

    preset: str = "tiny"
    num_layers: int | None = None  # override the preset's depth
    model_seed: int = 0
    num_samples: int = 128
    latent_sizes: tuple[tuple[int, int], ...] = ((16, 16), (12, 20))  # (h, w) latent pixels, one bucket each
    num_edits: int = 4
    offset_scale: float = 1.5  # std of each instruction's per-channel shift
    prompt_lengths: tuple[int, int] = (5, 12)  # inclusive range of prompt token counts
    data_seed: int = 0

    def dit_config(self) -> DiTConfig:
        dit = preset(self.preset)
        return dit if self.num_layers is None else dataclasses.replace(dit, num_layers=self.num_layers)


def make_demo_checkpoint(path: str | os.PathLike, spec: LatentDemo = LatentDemo()) -> str:
    """A randomly initialised model of `spec.preset` (`init_transformer`) saved as a diffusers transformer folder."""
    model = init_transformer(spec.dit_config(), seed=spec.model_seed)
    return save_transformer(model, path)


def _smooth_field(rng: np.random.Generator, channels: int, h: int, w: int) -> np.ndarray:
    """Unit-variance random latent with structure at 1/4 resolution (bilinear-free: block upsample + noise)."""
    coarse = rng.standard_normal((channels, (h + 3) // 4, (w + 3) // 4))
    field = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :h, :w]
    field = field + 0.3 * rng.standard_normal((channels, h, w))
    return (field / np.sqrt(1.09)).astype(np.float32)


def demo_samples(spec: LatentDemo, channels: int, joint_dim: int) -> Iterator[CachedSample]:
    """`spec.num_samples` synthetic edit examples (deterministic in `spec.data_seed`)."""
    rng = np.random.default_rng(spec.data_seed)
    lo, hi = spec.prompt_lengths
    prompts = rng.standard_normal((spec.num_edits, hi, joint_dim)).astype(np.float32)
    perms = [rng.permutation(channels) for _ in range(spec.num_edits)]
    signs = rng.choice([-1.0, 1.0], size=(spec.num_edits, channels)).astype(np.float32)
    offsets = (spec.offset_scale * rng.standard_normal((spec.num_edits, channels))).astype(np.float32)
    for i in range(spec.num_samples):
        k = i % spec.num_edits
        h, w = spec.latent_sizes[(i // spec.num_edits) % len(spec.latent_sizes)]
        ref = _smooth_field(rng, channels, h, w)
        target = signs[k][:, None, None] * ref[perms[k]] + offsets[k][:, None, None]
        length = int(rng.integers(lo, hi + 1))
        embeds = prompts[k, :length] + 0.1 * rng.standard_normal((length, joint_dim)).astype(np.float32)
        yield CachedSample(f"demo-{i:05d}-edit{k}", target.astype(np.float32), [ref], embeds,
                           np.ones(length, bool))


def write_latent_cache(path: str | os.PathLike, spec: LatentDemo = LatentDemo()) -> str:
    """`demo_samples` as a training cache for `spec`'s DiT (its latent channels and text width)."""
    dit = spec.dit_config()
    return write_cache(path, demo_samples(spec, dit.in_channels // 4, dit.joint_attention_dim),
                       metadata={"source": "qwen_edit_jax.testing.latent", "rule": "per-instruction channel map"})


def write_latent_demo(folder: str | os.PathLike, spec: LatentDemo = LatentDemo()) -> Path:
    """`folder/tiny-dit` (`make_demo_checkpoint`) and `folder/cache` (`write_latent_cache`), atomically;
    a folder already written with the same `spec` is reused, anything else there is an error."""
    dest = Path(folder).absolute()
    manifest = json.loads(json.dumps({"kind": "latent", **dataclasses.asdict(spec)}))  # tuples as JSON reads them
    if reuse(dest, manifest):
        return dest
    with atomic_path(dest, is_dir=True) as tmp:
        make_demo_checkpoint(os.path.join(tmp, MODEL_DIR), spec)
        write_latent_cache(os.path.join(tmp, CACHE_DIR), spec)
        mark_finished(tmp, manifest)
    return dest


__all__ = ["CACHE_DIR", "MODEL_DIR", "LatentDemo", "demo_samples", "make_demo_checkpoint", "write_latent_cache",
           "write_latent_demo"]
