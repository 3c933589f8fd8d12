"""Image sizes of a cached sample: the target's bucket and each reference's VAE and prompt sizes.

* **Target** (the edited image): area ≈ `resolution`² at the image's aspect ratio, both sides multiples
  of 32 (`imaging.bucket_size`: the pipelines' own rule, so a 1024 cache has the sizes the pipeline
  generates). An image with less area than `resolution`² is never enlarged: its sides are rounded
  down to multiples of 32 (unless `upscale`).
* **References, VAE side**: as the pipelines encode them: area 1024² (`VAE_IMAGE_SIZE`) at the
  reference's own aspect ratio, for Edit and Edit-Plus alike, enlarging small images as the pipelines
  do (`control_resolution="pipeline"`, the default). `control_resolution=N` uses area N² instead
  (cheaper training, but different from what the pipeline feeds the model); `"target"` resizes each
  reference to the target's bucket (musubi-tuner's default).
* **References, prompt side**: always exactly the pipeline's: `condition_image` (Edit: the 1024²-area
  image; Edit-Plus: 384² area), applied inside `QwenPromptEncoder.prepare`.

Every resize is diffusers' (PIL Lanczos, `imaging.vae_pixels`); nothing is cropped, so target and
references stay aligned.
"""

from __future__ import annotations

import dataclasses

from ..imaging import MULTIPLE, VAE_IMAGE_SIZE, Size, bucket_size, calculate_dimensions

CONTROL_MODES = ("pipeline", "target")


class SizeError(ValueError):
    """An image cannot be bucketed (too small, or an aspect ratio with a side under 32 px)."""


@dataclasses.dataclass(frozen=True)
class Sizing:
    """How a cache sizes its images (see the module docstring)."""

    resolution: int = 1024
    upscale: bool = False
    control_resolution: str | int = "pipeline"  # "pipeline" | "target" | N (area N²)

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution < MULTIPLE:
            raise ValueError(f"--resolution {self.resolution}: must be an integer >= {MULTIPLE}")
        c = self.control_resolution
        if not (c in CONTROL_MODES or (isinstance(c, int) and not isinstance(c, bool) and c >= MULTIPLE)):
            raise ValueError(f"--control-resolution {c!r}: expected 'pipeline', 'target' or an integer >= "
                             f"{MULTIPLE}")


def parse_control_resolution(text: str) -> str | int:
    """'pipeline' | 'target' | an integer (command-line form)."""
    if text in CONTROL_MODES:
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--control-resolution {text!r}: expected 'pipeline', 'target' or an integer "
                         f"(area N²)") from None


def _check(size: Size, width: int, height: int, what: str, hint: str = "") -> Size:
    if min(size) < MULTIPLE:
        raise SizeError(f"{what} {width}×{height} px gives a {size[0]}×{size[1]} bucket: every side must be at "
                        f"least {MULTIPLE} px{hint}")
    return size


def target_size(width: int, height: int, sizing: Sizing) -> Size:
    """(width, height) of the target's bucket."""
    area = sizing.resolution ** 2
    kept_small = not sizing.upscale and width * height < area
    hint = " (pass --upscale to enlarge small images)" if kept_small else " (the aspect ratio is too extreme)"
    return _check(bucket_size(width, height, area, upscale=sizing.upscale), width, height, "image of", hint)


def reference_vae_size(width: int, height: int, target: Size, sizing: Sizing) -> Size:
    """(width, height) a reference is resized to before the VAE."""
    if sizing.control_resolution == "target":
        return target
    area = VAE_IMAGE_SIZE if sizing.control_resolution == "pipeline" else int(sizing.control_resolution) ** 2
    return _check(calculate_dimensions(area, width / height), width, height, "reference image of",
                  " (the aspect ratio is too extreme)")


__all__ = ["CONTROL_MODES", "SizeError", "Sizing", "parse_control_resolution", "reference_vae_size", "target_size"]
