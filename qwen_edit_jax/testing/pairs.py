"""Synthetic edit pairs that a LoRA can learn and a person can check: one coloured square, four edits.

`write_demo_pairs(folder)` writes image pairs in the "folder" layout of `caching.layouts`
(`NNNN.png` the edited target, `NNNN.txt` its instruction, `control/NNNN.png` the input). Every
input is a plain background with one coloured square, sides and position multiples of 8 px (what
the readable VAE of `testing.vae` reproduces exactly); the instructions of `DEMO_EDITS` cycle over
the samples, each drawn so that its edit visibly changes the image. `demo_validation_prompts(folder)`
writes held-out inputs, one per edit, for validation grids during training.

Every writer builds its output under a temporary name beside the destination and renames it when
complete (`utils.files.atomic_path`); a destination that is already there with the same settings is
reused, anything else there is an error (`testing.manifest`).
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

from ..utils.files import atomic_path
from .manifest import mark_finished, reuse

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


def write_demo_pairs(folder: str | os.PathLike, *, num_pairs: int = 64, size: int = 128, seed: int = 0) -> Path:
    """`num_pairs` edit pairs in the folder layout (see the module docstring); an existing set is reused."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be at least 1, got {num_pairs}")
    dest = Path(folder).absolute()
    manifest = {"kind": "pairs", "num_pairs": num_pairs, "size": size, "seed": seed}
    if reuse(dest, manifest):
        return dest
    samples = edit_scenes(num_pairs, size, seed)  # checks the size before anything is made
    with atomic_path(dest, is_dir=True) as tmp:
        root = Path(tmp)
        (root / "control").mkdir()
        for i, (prompt, scene, edited) in enumerate(samples):
            _save_png(edited.render(), root / f"{i:04d}.png")
            (root / f"{i:04d}.txt").write_text(prompt + "\n")
            _save_png(scene.render(), root / "control" / f"{i:04d}.png")
        mark_finished(root, manifest)
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
    if not reuse(dest, manifest):
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
            mark_finished(root, manifest)
    listing = json.loads((dest / "prompts.json").read_text())
    return [{"prompt": e["prompt"], "images": [str(dest / p) for p in e["images"]],
             "expected": str(dest / e["expected"])} for e in listing]


__all__ = ["BACKGROUNDS", "DEMO_EDITS", "SQUARE_COLOURS", "Scene", "demo_validation_prompts", "edit_scenes",
           "training_scenes", "write_demo_pairs"]
