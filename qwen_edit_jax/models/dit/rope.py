"""3-axis RoPE of Qwen-Image (diffusers `QwenEmbedRope`, `scale_rope=True`, theta 10000).

Positions depend only on the static `img_shapes` and the text length, so angles (and their cos/sin)
are built with numpy at trace time (fp32, like diffusers' tables) and enter the program as constants.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ImgShape = tuple[int, int, int]
THETA = 10000.0


def axis_frequencies(axes_dims: Sequence[int], theta: float = THETA) -> list[np.ndarray]:
    """ω_k = 1/θ^(2k/a) for each axis of size a, fp32, as `rope_params` computes them."""
    return [
        (1.0 / np.power(np.float32(theta), np.arange(0, a, 2, dtype=np.float32) / np.float32(a))).astype(np.float32)
        for a in axes_dims
    ]


def image_positions(img_shapes: Sequence[ImgShape]) -> np.ndarray:
    """[N, 3] (frame, row, col) positions; image `idx` gets frame idx, rows/cols centred.

    Odd sizes centre asymmetrically: rows run from −⌈h/2⌉ to ⌊h/2⌋−1 (diffusers, not ComfyUI).
    """
    out = []
    for idx, (f, h, w) in enumerate(img_shapes):
        ff, rr, cc = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
        pos = np.stack([ff + idx, rr - (h - h // 2), cc - (w - w // 2)], axis=-1)
        out.append(pos.reshape(-1, 3))
    return np.concatenate(out, axis=0)


def text_start(img_shapes: Sequence[ImgShape]) -> int:
    """P0: text positions start at max over all images of max(⌊h/2⌋, ⌊w/2⌋)."""
    return max(max(h // 2, w // 2) for _, h, w in img_shapes)


def _angles(pos: np.ndarray, freqs: list[np.ndarray]) -> np.ndarray:
    """[S, 3] integer positions → [S, head_dim/2] fp32 angles (one per interleaved pair)."""
    return np.concatenate(
        [pos[:, i : i + 1].astype(np.float32) * freqs[i][None, :] for i in range(3)], axis=-1
    ).astype(np.float32)


def rope_angles(
    img_shapes: Sequence[ImgShape], txt_len: int, axes_dims: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Angles for the image tokens [N, d/2] and text tokens [L, d/2] of one sample's layout."""
    freqs = axis_frequencies(axes_dims)
    img = _angles(image_positions(img_shapes), freqs)
    p0 = text_start(img_shapes)
    txt_pos = np.repeat(np.arange(p0, p0 + txt_len)[:, None], 3, axis=1)
    return img, _angles(txt_pos, freqs)


def rotations(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of the angles in fp32, at trace time: the blocks then only multiply (no sin/cos
    inside the scan, where XLA would evaluate them for every head of every block)."""
    a = np.asarray(angles, np.float32)
    return np.cos(a), np.sin(a)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2k], x[2k+1]) by angle k in fp32. x: [B, S, H, d], cos/sin [S, d/2]."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
