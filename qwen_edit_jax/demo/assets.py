"""The end-to-end demo's inputs: a complete tiny Qwen-Image-Edit repo and a small synthetic edit dataset.

`write_demo_repo(path)` writes a diffusers-layout repo that `QwenImageEditPipeline.from_pretrained`
loads: the tiny tokenizer / processor / Qwen2.5-VL of `caching.tiny`, the readable VAE of
`demo.vae` (encode → decode is exact on flat 8×8 blocks, so decoded samples are pictures, not
noise), a random DiT of the `tiny` preset (its text width 64 is the tiny encoder's; drawn with numpy
as `init_transformer` draws) and the released scheduler config.

`write_demo_pairs(folder)` writes image pairs in the "folder" layout of `caching.layouts`
(`NNNN.png` the edited target, `NNNN.txt` its instruction, `control/NNNN.png` the input). Every
input is a plain background with one coloured square, sides and position multiples of 8 px (what
the readable VAE reproduces exactly); the instructions of `DEMO_EDITS` cycle over the samples, each
drawn so that its edit visibly changes the image. `demo_validation_prompts(folder)` writes held-out
inputs, one per edit, for validation grids during training.

Every writer builds its output under a temporary name beside the destination and renames it when
complete (`utils.files.atomic_path`); a destination that is already there with the same settings
(the hidden `.demo.json` manifest says which) is reused, anything else there is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..caching.tiny import PIPELINE_CLASS, TINY_VAE, write_model_index, write_tiny_text_parts
from ..config import DiTConfig, preset
from ..loading.vae import save_vae
from ..models.vae import VAEConfig
from ..utils.files import atomic_path
from ..weights.keymap import torch_shapes
from ..weights.safetensors_io import SINGLE_NAME
from ..weights.writer import write_safetensors_file
from .vae import readable_vae_config, readable_vae_params

MANIFEST = ".demo.json"  # hidden: the folder layout reader skips dot-files
DIT_PRESET = "tiny"
# the released Qwen-Image(-Edit) scheduler/scheduler_config.json (see shared/reference/qwen_image_dit.md §6)
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.34.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}

RGB = tuple[int, int, int]
RED: RGB = (255, 0, 0)
BLACK: RGB = (0, 0, 0)
BACKGROUNDS: tuple[RGB, ...] = (BLACK, (255, 255, 255), (128, 128, 128))
SQUARE_COLOURS: tuple[RGB, ...] = (RED, (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
                                   (255, 128, 0))
BLOCK = 8  # the readable VAE is exact on flat BLOCK×BLOCK tiles
MIN_SIZE, SIZE_MULTIPLE = 64, 32  # the pipelines size images in multiples of 32
VALIDATION_STREAM = 1  # validation scenes come from the random stream (seed, 1), training ones from seed


# ---- scenes and edits ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scene:
    """A `size`² image: `background` everywhere, a `side`² square of `colour` at (`top`, `left`)."""

    size: int
    background: RGB
    colour: RGB
    top: int
    left: int
    side: int

    def render(self) -> np.ndarray:
        """[size, size, 3] uint8."""
        img = np.empty((self.size, self.size, 3), np.uint8)
        img[:] = self.background
        img[self.top:self.top + self.side, self.left:self.left + self.side] = self.colour
        return img


def _recolour(scene: Scene) -> Scene:
    return dataclasses.replace(scene, colour=RED)


def _mirror(scene: Scene) -> Scene:
    return dataclasses.replace(scene, left=scene.size - scene.left - scene.side)


def _black_background(scene: Scene) -> Scene:
    return dataclasses.replace(scene, background=BLACK)


def _to_left_edge(scene: Scene) -> Scene:
    return dataclasses.replace(scene, left=0)


# instruction (the caption) → what it does to the scene; samples cycle through them in this order
DEMO_EDITS: dict[str, Callable[[Scene], Scene]] = {
    "make the square red": _recolour,
    "mirror the image": _mirror,
    "make the background black": _black_background,
    "move the square to the left edge": _to_left_edge,
}


def _random_scene(rng: np.random.Generator, size: int) -> Scene:
    cells = size // BLOCK
    side = BLOCK * int(rng.integers(2, cells // 2 + 1))
    top, left = (BLOCK * int(rng.integers(0, cells - side // BLOCK + 1)) for _ in range(2))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    colour = SQUARE_COLOURS[int(rng.integers(len(SQUARE_COLOURS)))]
    return Scene(size, background, colour, top, left, side)


def edit_scenes(num: int, size: int, seed: int | Sequence[int], *, exclude: Collection[Scene] = (),
                ) -> list[tuple[str, Scene, Scene]]:
    """`num` (instruction, input scene, edited scene), instructions cycling over `DEMO_EDITS`; each input
    is redrawn until its edit changes the image and it is not in `exclude`. Deterministic in `seed`."""
    if size % SIZE_MULTIPLE or size < MIN_SIZE:
        raise ValueError(f"size must be a multiple of {SIZE_MULTIPLE} and at least {MIN_SIZE}, got {size}")
    rng = np.random.default_rng(seed)
    edits = list(DEMO_EDITS.items())
    out = []
    for i in range(num):
        prompt, edit = edits[i % len(edits)]
        scene = _random_scene(rng, size)
        while scene in exclude or edit(scene) == scene:
            scene = _random_scene(rng, size)
        out.append((prompt, scene, edit(scene)))
    return out


# ---- writers ----------------------------------------------------------------------------------------
def _save_png(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img, "RGB").save(path)


def _reuse(dest: Path, manifest: dict[str, Any]) -> bool:
    """True when `dest` holds a finished demo output made with `manifest`'s settings; False when it is
    absent; an error for anything else there (never overwritten)."""
    if not os.path.lexists(dest):
        return False
    try:
        found = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        found = None
    if found != manifest:
        settings = ", ".join(f"{k}={v!r}" for k, v in manifest.items() if k != "kind")
        was = "it was written with other settings" if isinstance(found, dict) and found.get("kind") == \
            manifest["kind"] else f"no {MANIFEST} of a finished demo {manifest['kind']} there"
        raise FileExistsError(f"{dest} exists but is not the demo {manifest['kind']} for {settings} ({was}); "
                              f"remove it or choose another folder")
    return True


def _write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2))


def write_random_transformer(folder: str | os.PathLike, config: DiTConfig, seed: int = 0) -> Path:
    """A random DiT as a diffusers `transformer/` folder (config.json + one safetensors file).

    Drawn as `init_transformer` draws (kernels N(0, 1/fan_in), biases 0, norm scales 1) but with
    numpy, straight in torch layout: JAX compiles its RNG once per tensor shape, 5–8 s on a CPU.
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in torch_shapes(config).items():
        if name.endswith(".bias"):
            tensors[name] = np.zeros(shape, np.float32)
        elif len(shape) == 1:  # RMSNorm scale
            tensors[name] = np.ones(shape, np.float32)
        else:  # Linear weight [out, in]
            tensors[name] = (rng.standard_normal(shape, np.float32) / np.sqrt(shape[1])).astype(np.float32)
    folder = Path(folder)
    with atomic_path(folder, is_dir=True) as tmp:
        config.to_json(os.path.join(tmp, "config.json"))
        write_safetensors_file(os.path.join(tmp, SINGLE_NAME), tensors, metadata={"format": "pt"})
    return folder


def demo_vae_config() -> VAEConfig:
    """The tiny VAE architecture (`caching.tiny.TINY_VAE`) with unit latent normalisation."""
    return readable_vae_config(VAEConfig(**TINY_VAE))


def write_demo_repo(path: str | os.PathLike, *, variant: str = "edit_plus", seed: int = 0) -> Path:
    """The complete tiny repo (see the module docstring) at `path`; an existing one is reused."""
    if variant not in PIPELINE_CLASS:
        raise ValueError(f"variant must be one of {sorted(PIPELINE_CLASS)}, got {variant!r}")
    dest = Path(path).absolute()
    manifest = {"kind": "repo", "variant": variant, "seed": seed, "dit_preset": DIT_PRESET}
    if _reuse(dest, manifest):
        return dest
    with atomic_path(dest, is_dir=True) as tmp:
        root = Path(tmp)
        write_tiny_text_parts(root, seed)
        config = demo_vae_config()
        save_vae(readable_vae_params(config), root / "vae", config=config)
        write_random_transformer(root / "transformer", preset(DIT_PRESET), seed)
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
        write_model_index(root, variant, transformer=True, scheduler=True)
        _write_manifest(root, manifest)
    return dest


def write_demo_pairs(folder: str | os.PathLike, *, num_pairs: int = 64, size: int = 128, seed: int = 0) -> Path:
    """`num_pairs` edit pairs in the folder layout (see the module docstring); an existing set is reused."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be at least 1, got {num_pairs}")
    dest = Path(folder).absolute()
    manifest = {"kind": "pairs", "num_pairs": num_pairs, "size": size, "seed": seed}
    if _reuse(dest, manifest):
        return dest
    samples = edit_scenes(num_pairs, size, seed)  # checks the size before anything is made
    with atomic_path(dest, is_dir=True) as tmp:
        root = Path(tmp)
        (root / "control").mkdir()
        for i, (prompt, scene, edited) in enumerate(samples):
            _save_png(edited.render(), root / f"{i:04d}.png")
            (root / f"{i:04d}.txt").write_text(prompt + "\n")
            _save_png(scene.render(), root / "control" / f"{i:04d}.png")
        _write_manifest(root, manifest)
    return dest


def training_scenes(num_pairs: int, size: int, seed: int) -> frozenset[Scene]:
    """The input scenes `write_demo_pairs` draws for these settings."""
    return frozenset(scene for _, scene, _ in edit_scenes(num_pairs, size, seed))


def demo_validation_prompts(folder: str | os.PathLike, *, size: int = 128, seed: int = 0,
                            num_pairs: int = 64) -> list[dict[str, Any]]:
    """Held-out validation inputs, one per edit of `DEMO_EDITS`, written to `folder` (`NN.png` the input,
    `NN_expected.png` what the edit should give) and listed in `folder/prompts.json`.

    Returns `[{"prompt": ..., "images": [input path], "expected": path}, ...]`. No input equals one of
    the training inputs of `write_demo_pairs(num_pairs=..., size=..., seed=...)`.
    """
    dest = Path(folder).absolute()
    manifest = {"kind": "validation", "size": size, "seed": seed, "num_pairs": num_pairs}
    if not _reuse(dest, manifest):
        held_out = training_scenes(num_pairs, size, seed)
        samples = edit_scenes(len(DEMO_EDITS), size, (seed, VALIDATION_STREAM), exclude=held_out)
        with atomic_path(dest, is_dir=True) as tmp:
            root = Path(tmp)
            listing = []
            for i, (prompt, scene, edited) in enumerate(samples):
                _save_png(scene.render(), root / f"{i:02d}.png")
                _save_png(edited.render(), root / f"{i:02d}_expected.png")
                listing.append({"prompt": prompt, "images": [f"{i:02d}.png"], "expected": f"{i:02d}_expected.png"})
            (root / "prompts.json").write_text(json.dumps(listing, indent=2))
            _write_manifest(root, manifest)
    listing = json.loads((dest / "prompts.json").read_text())
    return [{"prompt": e["prompt"], "images": [str(dest / p) for p in e["images"]],
             "expected": str(dest / e["expected"])} for e in listing]


__all__ = ["BACKGROUNDS", "DEMO_EDITS", "MANIFEST", "SCHEDULER_CONFIG", "SQUARE_COLOURS", "Scene",
           "demo_validation_prompts", "demo_vae_config", "edit_scenes", "training_scenes", "write_demo_pairs",
           "write_demo_repo", "write_random_transformer"]
