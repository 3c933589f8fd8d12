"""`VAEConfig`: the fields of diffusers' `vae/config.json` for `AutoencoderKLQwenImage`.

The defaults are the released architecture (Qwen-Image, -Edit, -2509, -2511: the Wan-2.1 VAE
layout, 127M parameters) with its 16 latent normalisation constants.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ...config import build_config, read_json_config

LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

CLASS_NAME = "AutoencoderKLQwenImage"
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of `AutoencoderKLQwenImage`; field names (typos included) equal diffusers' keys."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0  # inference only: unused
    input_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):
        for name, cast in (("dim_mult", int), ("attn_scales", float), ("temperal_downsample", bool),
                           ("latents_mean", float), ("latents_std", float)):
            object.__setattr__(self, name, tuple(cast(v) for v in getattr(self, name)))
        problems = []
        for name in ("base_dim", "z_dim", "num_res_blocks", "input_channels"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not self.dim_mult or any(m <= 0 for m in self.dim_mult):
            problems.append(f"dim_mult {list(self.dim_mult)} must be a non-empty list of positive ints")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            problems.append(f"temperal_downsample has {len(self.temperal_downsample)} entries, dim_mult "
                            f"{list(self.dim_mult)} needs {len(self.dim_mult) - 1}")
        if self.attn_scales:
            problems.append(f"attn_scales {list(self.attn_scales)} is not supported (diffusers' encoder cannot run "
                            "attention in its down blocks either); released VAEs use []")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                problems.append(f"{name} has {len(getattr(self, name))} values, z_dim is {self.z_dim}")
        if any(s <= 0 for s in self.latents_std):
            problems.append("latents_std values must be positive")
        if problems:
            raise ValueError("Invalid VAEConfig: " + "; ".join(problems))

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (8 for the released VAE)."""
        return 2 ** len(self.temperal_downsample)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "VAEConfig":
        d = dict(d)
        name = d.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"{source}: _class_name is {name!r}, expected {CLASS_NAME!r} (a Qwen-Image vae/ folder)")
        return build_config(cls, d, ignored=_IGNORED_KEYS, source=source)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "VAEConfig":
        """Read a diffusers `config.json` (a file, or a `vae/` folder holding one)."""
        d, path = read_json_config(path, "VAE config")
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict[str, Any]:
        """The diffusers `config.json` content."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": CLASS_NAME, **d}
