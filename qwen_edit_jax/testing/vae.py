"""The tiny Qwen-Image VAE of the fixture repos: random weights (`write_tiny_vae`), or *readable* ones.

`TINY_VAE` is the architecture: 4 levels, so the spatial factor is 8 as released, z_dim 16 as the DiT
packs. The readable weights (`readable_vae_params`, saved with `demo_vae_config`) are hand-set: a random
VAE decodes to noise, so a demo could not show what a LoRA learned. They make the VAE an exact
block-mean codec: `decode(encode(x))` equals x averaged over 8×8 pixel blocks (to ~1e-5
in fp32), so an image made of flat 8×8 blocks comes back as it went in. The construction:

- Signal path: every feature map carries each colour twice with opposite signs plus a constant
  channel, `(r, g, b, −r, −g, −b, K, 0, …)`. `encoder.conv_in` builds it (centre tap ±1, the constant
  K from its bias).
- Residual blocks are identities: `conv1` and `conv2` are 0 (a 1×1 `conv_shortcut` embeds the channels
  when the width changes); the mid-block attention has `to_qkv` = `proj` = 0, so it adds nothing.
- Down-sampling convs (3×3, stride 2, zero pad right/bottom) average each 2×2 block (taps (0,0),
  (0,1), (1,0), (1,1) at ¼, all inside the image), which keeps K constant; three of them give the
  8×8 block mean. Up-sampling convs (nearest ×2, then 3×3) copy the channels with their centre tap.
- Heads `conv_out(silu(rms_norm(x)))`: rms_norm divides by ‖x‖₂ ≈ K (the constant dominates), so the
  signal channels' γ = K/√C undoes it to second order (relative error ≈ |rgb|²/K², K = 1024), and
  `conv_out` takes `silu(a) − silu(−a) = a` of each ± pair, which is exact.
- Latents: the encoder's mean half is `M · rgb` with M = z_dim×3 columns of a Sylvester Hadamard
  matrix (entries ±1, orthogonal columns of norm √z_dim), so every latent channel is ±r ± g ± b: unit
  variance for colours uniform in [−1, 1], and `latents_mean` 0 / `latents_std` 1 in the config make
  the normalised latents the same numbers. The log-variance half is `LOGVAR` (posterior std e^−10:
  a sample equals the mode). `quant_conv` / `post_quant_conv` are identities and `decoder.conv_in`
  applies the pseudo-inverse Mᵀ / z_dim to get back to `(r, g, b, −r, −g, −b, K)`.

Colours must lie in [−1, 1] (the decoder clamps its output there, as diffusers does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..loading.vae import expected_tensors
from ..models.vae import VAEConfig
from ..weights.vae_keys import vae_keys
from .random_weights import random_tensor

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True])

K = 1024.0  # the constant channel; a power of two, so K and the encoder's γ = K/4 are exact in bf16 too
LOGVAR = -20.0  # the posterior's log-variance (diffusers clamps at −30): std e^−10, sampling ≈ the mode
COLOUR_CHANNELS = 3


def write_tiny_vae(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A random `TINY_VAE` (random latent normalisation too) as a diffusers `vae/` folder; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    config = VAEConfig(**TINY_VAE, latents_mean=tuple(rng.normal(0, 0.5, 16).round(3)),
                       latents_std=tuple(rng.uniform(0.5, 2.0, 16).round(3)))
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    tensors = {name: random_tensor(tuple(shape), name, rng) for name, shape in sorted(expected_tensors(config).items())}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def latent_matrix(z_dim: int, channels: int = COLOUR_CHANNELS) -> np.ndarray:
    """M [z_dim, channels]: columns 1, 2, 4, … of the Sylvester Hadamard matrix (±1 entries, orthogonal
    columns of norm √z_dim, every row norm √channels), so `M · rgb` has unit variance per channel for
    colours uniform in [−1, 1]. Needs z_dim a power of two with `2 ** channels <= 2 * z_dim`."""
    if z_dim < 1 or z_dim & (z_dim - 1) or 2 ** channels > 2 * z_dim:
        raise ValueError(f"the readable VAE needs z_dim a power of two >= {2 ** (channels - 1)}, got {z_dim}")
    rows = np.arange(z_dim)[:, None]
    cols = (1 << np.arange(channels))[None, :]
    parity = np.vectorize(lambda v: bin(int(v)).count("1") % 2)(rows & cols)
    return (1.0 - 2.0 * parity).astype(np.float64)


def _flax_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """{Flax path: Flax shape} (HWIO kernels, [C] gammas) of every parameter the 2D model has."""
    out = {}
    for key in vae_keys(config):
        if key.flax is None:
            continue
        s = key.shape
        if key.name.endswith(".gamma"):
            out[key.flax] = (s[0],)
        elif len(s) >= 4:  # OI(D)HW → HWIO
            out[key.flax] = (s[-2], s[-1], s[1], s[0])
        else:
            out[key.flax] = s
    return out


def _signal_gamma(width: int, c: int) -> np.ndarray:
    """The head norm's γ: K/√width on the 2c signal channels (undoes ‖x‖ ≈ K), 1 elsewhere."""
    gamma = np.ones(width)
    gamma[: 2 * c] = K / math.sqrt(width)
    return gamma


def readable_vae_params(config: VAEConfig) -> dict[str, np.ndarray]:
    """{dotted Flax path: float32 array} of the readable VAE (see the module docstring) for `config`.

    Works for any architecture whose feature maps are at least 2·input_channels + 1 wide and whose
    z_dim suits `latent_matrix`; the config's own `latents_mean` / `latents_std` are not used (save
    with `readable_vae_config`, which sets them to 0 / 1).
    """
    c, z = config.input_channels, config.z_dim
    shapes = _flax_shapes(config)
    narrowest = min(s[0] for n, s in shapes.items() if n.endswith(".gamma"))  # every feature map is normed
    if narrowest < 2 * c + 1:
        raise ValueError(f"the readable VAE needs feature maps at least {2 * c + 1} channels wide; base_dim "
                         f"{config.base_dim} with dim_mult {list(config.dim_mult)} has {narrowest}")
    m = latent_matrix(z, c)
    signs = np.concatenate([np.eye(c), -np.eye(c)])  # [2c, c]: rgb → (rgb, −rgb)
    params: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        p = np.ones(shape) if name.endswith(".gamma") else np.zeros(shape)
        if name.endswith("conv_shortcut.kernel"):
            p[0, 0] = np.eye(shape[2], shape[3])
        elif re.fullmatch(r"encoder\.down_blocks\.\d+\.resample\.kernel", name):
            p[:2, :2] = np.eye(shape[2], shape[3]) / 4.0
        elif re.fullmatch(r"decoder\.up_blocks\.\d+\.upsamplers\.0\.resample\.kernel", name):
            p[1, 1] = np.eye(shape[2], shape[3])
        elif name in ("quant_conv.kernel", "post_quant_conv.kernel"):
            p[0, 0] = np.eye(shape[2], shape[3])
        params[name] = p
    # encoder: rgb → (rgb, −rgb, K, 0…)
    params["encoder.conv_in.kernel"][1, 1, :, : 2 * c] = signs.T
    params["encoder.conv_in.bias"][2 * c] = K
    params["encoder.norm_out.gamma"] = _signal_gamma(params["encoder.norm_out.gamma"].shape[0], c)
    params["encoder.conv_out.kernel"][1, 1, : 2 * c, :z] = signs @ m.T  # (a, −a) → M · a
    params["encoder.conv_out.bias"][z:] = LOGVAR
    # decoder: latents → (rgb, −rgb, K, 0…) → rgb
    params["decoder.conv_in.kernel"][1, 1, :, : 2 * c] = (signs @ (m.T / z)).T  # pinv(M) = Mᵀ / z_dim
    params["decoder.conv_in.bias"][2 * c] = K
    params["decoder.norm_out.gamma"] = _signal_gamma(params["decoder.norm_out.gamma"].shape[0], c)
    params["decoder.conv_out.kernel"][1, 1, : 2 * c, :] = signs
    return {k: v.astype(np.float32) for k, v in params.items()}


def readable_vae_config(config: VAEConfig) -> VAEConfig:
    """`config` with latents_mean 0 and latents_std 1: the raw latents are already unit-scale."""
    return dataclasses.replace(config, latents_mean=(0.0,) * config.z_dim, latents_std=(1.0,) * config.z_dim)


def demo_vae_config() -> VAEConfig:
    """`TINY_VAE` with unit latent normalisation: the config the readable weights are saved with."""
    return readable_vae_config(VAEConfig(**TINY_VAE))


__all__ = ["K", "LOGVAR", "TINY_VAE", "demo_vae_config", "latent_matrix", "readable_vae_config", "readable_vae_params",
           "write_tiny_vae"]
