"""Latent packing, equal to the pipelines' `_pack_latents` / `_unpack_latents`.

A VAE latent `[B, C, (1,) H, W]` becomes `[B, (H/2)(W/2), C·4]` tokens: token index row·w + col,
feature index c·4 + py·2 + px (channel outermost).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array | np.ndarray


def pack_latents(latents: Array) -> Array:
    """[B, C, H, W] or [B, C, 1, H, W] → [B, (H/2)·(W/2), 4C]. H and W must be even."""
    xp = jnp if isinstance(latents, jax.Array) else np
    if latents.ndim == 5:
        if latents.shape[2] != 1:
            raise ValueError(f"expected one frame, got latents of shape {tuple(latents.shape)}")
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height/width must be even (image sides multiples of 16), got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    x = xp.transpose(x, (0, 2, 4, 1, 3, 5))
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Array, height: int, width: int, *, frames_axis: bool = True) -> Array:
    """Inverse of `pack_latents` for a latent of `height`×`width` (latent pixels, not image pixels).

    Returns `[B, C, 1, H, W]` like the pipelines (or `[B, C, H, W]` with `frames_axis=False`).
    """
    xp = jnp if isinstance(tokens, jax.Array) else np
    b, n, f = tokens.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or f % 4:
        raise ValueError(f"cannot unpack tokens {tuple(tokens.shape)} into a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, f // 4, 2, 2)
    x = xp.transpose(x, (0, 3, 1, 4, 2, 5)).reshape(b, f // 4, height, width)
    return x[:, :, None] if frames_axis else x
