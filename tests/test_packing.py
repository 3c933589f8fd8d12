"""pack/unpack equal the pipelines' `_pack_latents` / `_unpack_latents` exactly."""

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

import jax.numpy as jnp

from qwen_edit_jax import pack_latents, unpack_latents


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10), (14, 4)])
def test_pack_matches_pipeline(h, w):
    lat = np.random.default_rng(0).standard_normal((2, 16, 1, h, w)).astype(np.float32)
    ref = QwenImagePipeline._pack_latents(torch.from_numpy(lat[:, :, 0]), 2, 16, h, w).numpy()
    ours = pack_latents(lat)
    assert ours.shape == (2, (h // 2) * (w // 2), 64)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(np.asarray(pack_latents(jnp.asarray(lat))), ref)


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10)])
def test_unpack_matches_pipeline(h, w):
    tokens = np.random.default_rng(1).standard_normal((2, (h // 2) * (w // 2), 64)).astype(np.float32)
    # the pipeline takes pixel sizes and the VAE scale factor (8)
    ref = QwenImagePipeline._unpack_latents(torch.from_numpy(tokens), h * 8, w * 8, 8).numpy()
    ours = unpack_latents(tokens, h, w)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(pack_latents(ours), tokens)


def test_pack_errors():
    with pytest.raises(ValueError, match="even"):
        pack_latents(np.zeros((1, 16, 5, 4), np.float32))
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack_latents(np.zeros((1, 5, 64), np.float32), 4, 4)
