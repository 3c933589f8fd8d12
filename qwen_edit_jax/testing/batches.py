"""Tiny random inputs for the DiT: one forward call's keyword arguments, or one training step's batch.

Drawn with numpy from a seed, so every test that asks for the same inputs gets the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..config import DiTConfig, preset


def forward_inputs(img_shapes: Sequence[tuple[int, int, int]], seed: int = 0, *, batch: int = 2, txt: int = 5,
                   padding: int = 0, config: DiTConfig | None = None) -> dict[str, Any]:
    """`model(**inputs)` for `batch` rows of the images `img_shapes` ((frames, h, w) in tokens) and `txt`
    text tokens, the last `padding` of them masked out; timesteps evenly spaced in [0.3, 0.7]."""
    config = config or preset("tiny")
    rng = np.random.default_rng(seed)
    n_img = sum(f * h * w for f, h, w in img_shapes)
    return dict(
        hidden_states=jnp.asarray(rng.standard_normal((batch, n_img, config.in_channels)), jnp.float32),
        encoder_hidden_states=jnp.asarray(rng.standard_normal((batch, txt, config.joint_attention_dim)), jnp.float32),
        encoder_hidden_states_mask=jnp.asarray(np.tile(np.arange(txt) < txt - padding, (batch, 1))),
        timestep=jnp.asarray(np.linspace(0.3, 0.7, batch), jnp.float32),
        img_shapes=[list(img_shapes)] * batch,
    )


def train_batch(seed: int = 0, *, accum: int = 1, batch: int = 2, txt: int = 5, tokens: int = 6,
                config: DiTConfig | None = None) -> dict[str, np.ndarray]:
    """A training step's arrays ([accum, batch, ...]): `tokens` target and reference tokens each, `txt`
    prompt tokens of which the last is padding."""
    config = config or preset("tiny")
    rng = np.random.default_rng(seed)
    return {
        "target": rng.standard_normal((accum, batch, tokens, config.in_channels)).astype(np.float32),
        "references": rng.standard_normal((accum, batch, tokens, config.in_channels)).astype(np.float32),
        "prompt_embeds": rng.standard_normal((accum, batch, txt, config.joint_attention_dim)).astype(np.float32),
        "prompt_mask": np.tile(np.arange(txt) < txt - 1, (accum, batch, 1)),
    }


__all__ = ["forward_inputs", "train_batch"]
