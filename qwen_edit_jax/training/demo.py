"""Synthetic latent-demo inputs: a tiny Qwen-Image-Edit-shaped checkpoint and a cached edit dataset.

The dataset's edit is a learnable rule. Each of `num_edits` instructions has its own prompt (a
fixed random token sequence, cut to a random length, plus a little noise) and its own per-token
channel map: target[c] = sign_k[c] · reference[perm_k[c]] + offset_k[c]. Reference latents are
smooth random fields. Predicting the target therefore needs the instruction (text tokens) and
the reference (the same position in the second image), exactly what the edit model attends to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from ..cache_format import CachedSample, write_cache
from ..config import DiTConfig, preset
from ..loading import save_transformer
from ..models.dit import init_transformer


@dataclasses.dataclass(frozen=True)
class DemoSection:
    """How the latent demo's inputs are made; the defaults are those of train/configs/latent_demo.yaml."""

    preset: str = "tiny"
    num_layers: int | None = None  # override the preset's depth
    model_seed: int = 0
    num_samples: int = 128
    latent_sizes: tuple[tuple[int, int], ...] = ((16, 16), (12, 20))  # (h, w) latent pixels, one bucket each
    num_edits: int = 4
    offset_scale: float = 1.5  # std of each instruction's per-channel shift
    prompt_lengths: tuple[int, int] = (5, 12)  # inclusive range of prompt token counts
    data_seed: int = 0


def demo_dit_config(cfg: DemoSection) -> DiTConfig:
    dit = preset(cfg.preset)
    if cfg.num_layers is not None:
        dit = dataclasses.replace(dit, num_layers=cfg.num_layers)
    return dit


def make_demo_checkpoint(path: str, cfg: DemoSection) -> str:
    """A randomly initialised model of `cfg.preset` saved as a diffusers transformer folder."""
    model = init_transformer(demo_dit_config(cfg), seed=cfg.model_seed)
    return save_transformer(model, path)


def _smooth_field(rng: np.random.Generator, channels: int, h: int, w: int) -> np.ndarray:
    """Unit-variance random latent with structure at 1/4 resolution (bilinear-free: block upsample + noise)."""
    coarse = rng.standard_normal((channels, (h + 3) // 4, (w + 3) // 4))
    field = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :h, :w]
    field = field + 0.3 * rng.standard_normal((channels, h, w))
    return (field / np.sqrt(1.09)).astype(np.float32)


def demo_samples(cfg: DemoSection, channels: int, joint_dim: int) -> Iterator[CachedSample]:
    """`cfg.num_samples` synthetic edit examples (deterministic in `cfg.data_seed`)."""
    rng = np.random.default_rng(cfg.data_seed)
    lo, hi = cfg.prompt_lengths
    prompts = rng.standard_normal((cfg.num_edits, hi, joint_dim)).astype(np.float32)
    perms = [rng.permutation(channels) for _ in range(cfg.num_edits)]
    signs = rng.choice([-1.0, 1.0], size=(cfg.num_edits, channels)).astype(np.float32)
    offsets = (cfg.offset_scale * rng.standard_normal((cfg.num_edits, channels))).astype(np.float32)
    for i in range(cfg.num_samples):
        k = i % cfg.num_edits
        h, w = cfg.latent_sizes[(i // cfg.num_edits) % len(cfg.latent_sizes)]
        ref = _smooth_field(rng, channels, h, w)
        target = signs[k][:, None, None] * ref[perms[k]] + offsets[k][:, None, None]
        length = int(rng.integers(lo, hi + 1))
        embeds = prompts[k, :length] + 0.1 * rng.standard_normal((length, joint_dim)).astype(np.float32)
        yield CachedSample(f"demo-{i:05d}-edit{k}", target.astype(np.float32), [ref], embeds,
                           np.ones(length, bool))


def write_latent_demo(model_path: str, data_path: str, cfg: DemoSection = DemoSection(), log=print) -> None:
    """Write the demo's random checkpoint to `model_path` and its synthetic cache to `data_path`."""
    dit = demo_dit_config(cfg)
    log(f"demo: writing a random {cfg.preset} checkpoint ({dit.num_layers} layers, dim {dit.inner_dim}) "
        f"to {model_path}")
    make_demo_checkpoint(model_path, cfg)
    log(f"demo: writing {cfg.num_samples} synthetic edit samples to {data_path}")
    write_cache(data_path, demo_samples(cfg, dit.in_channels // 4, dit.joint_attention_dim),
                metadata={"source": "qwen_edit_jax.training.demo", "rule": "per-instruction channel map"})
