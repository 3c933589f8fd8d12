"""The Qwen-Image VAE (diffusers `AutoencoderKLQwenImage`) as a 2D image network; no file I/O."""

from .config import LATENTS_MEAN, LATENTS_STD, VAEConfig
from .model import (
    DEFAULT_ATTENTION,
    AutoencoderKLQwenImage,
    decode_latents,
    denormalize_latents,
    encode_images,
    normalize_latents,
)

__all__ = [
    "DEFAULT_ATTENTION", "LATENTS_MEAN", "LATENTS_STD", "AutoencoderKLQwenImage", "VAEConfig", "decode_latents",
    "denormalize_latents", "encode_images", "normalize_latents",
]
