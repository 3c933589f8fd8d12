"""diffusers' `AutoencoderKLQwenImage` as the reference for the VAE tests, the sharding worker and the benchmark.

Every parameter is random (weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1²), norm gammas ~ U(0.5, 1.5)),
and the decoder's `conv_out` is scaled by 0.3 so that decoded images stay mostly inside diffusers'
[-1, 1] clamp, which would otherwise hide differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Tiny architectures covering the code paths: 2/3/4 levels, 1–2 res blocks, 2D and 3D resample modes
# (3D modes carry the unused `time_conv`), shortcut convs, RGBA input, z_dim ≠ 16.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "three_levels": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                         latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]),
    "two_levels_rgba": dict(base_dim=8, z_dim=3, dim_mult=[1, 2], num_res_blocks=2, temperal_downsample=[True],
                            input_channels=4, latents_mean=[0.5, 0.0, -1.0], latents_std=[2.0, 1.0, 0.5]),
    "four_levels": dict(base_dim=4, z_dim=6, dim_mult=[1, 2, 3, 2], num_res_blocks=1,
                        temperal_downsample=[True, False, True], latents_mean=[0.0] * 6,
                        latents_std=[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]),
}


def torch_vae(config: dict[str, Any] | None = None, seed: int = 0):
    """A diffusers `AutoencoderKLQwenImage(**config)` in eval mode with every parameter random."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):  # skip torch's default init (seconds for the 127M model); every value is set below
        model = AutoencoderKLQwenImage(**(config or {}))
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
        model.decoder.conv_out.weight.mul_(0.3)
    return model.eval()


def to_bf16(model):
    """A bf16 copy (diffusers' own bf16 run: `vae.to(torch.bfloat16)`)."""
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16)


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _mean_std(model) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.asarray(model.config[k], np.float64)[None, :, None, None] for k in ("latents_mean", "latents_std"))


def torch_encode(model, images: np.ndarray, normalize: bool = True) -> np.ndarray:
    """What the edit pipelines do: `vae.encode(x[:, :, None]).latent_dist.mode()`, then `(z − mean) / std`."""
    import torch

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        z = model.encode(torch.from_numpy(images).to(dtype)[:, :, None]).latent_dist.mode()[:, :, 0].float().numpy()
    if normalize:
        mean, std = _mean_std(model)
        z = (z - mean) / std
    return z


def torch_decode(model, latents: np.ndarray, normalized: bool = True) -> np.ndarray:
    """`vae.decode(z · std + mean)` on one frame (diffusers clamps to [-1, 1])."""
    import torch

    if normalized:
        mean, std = _mean_std(model)
        latents = (latents * std + mean).astype(np.float32)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model.decode(torch.from_numpy(latents).to(dtype)[:, :, None]).sample[:, :, 0].float().numpy()

