"""The Qwen-Image VAE for images: the 2D network equal to diffusers' causal 3D one on a single frame.

For one frame (T = 1) diffusers' `AutoencoderKLQwenImage` runs one encoder chunk and one decoder
step with an empty feature cache, so
- every causal 3D conv sees two zero frames in front of the image: only the kernel's last temporal
  tap touches data, i.e. it is a 2D conv with `W[:, :, -1]`;
- the temporal resamplers take their "first chunk" branch and skip `time_conv`;
- the attention block already works frame by frame.
What is left is a plain 2D conv net (≈ ⅓ of the 3D FLOPs). Module and attribute names mirror
diffusers (`encoder.down_blocks.3.conv1`, `decoder.up_blocks.0.upsamplers.0.resample`, …) so the
key map (`weights/vae_keys.py`) is near-identity.

Layout inside is NHWC with HWIO kernels; `encode_images` / `decode_latents` take and return
channels-first arrays like diffusers. Parameters and activations share one dtype (as
`vae.to(torch.bfloat16)`); conv accumulation, the norm's L2 reduction and the latent
(de)normalisation run in fp32.
"""

from __future__ import annotations

import math
from itertools import pairwise

import jax
import jax.numpy as jnp
from flax import nnx

from ...parallel import constrain
from ..kernels import get_attention
from .config import VAEConfig

F32 = jnp.float32
DEFAULT_ATTENTION = "auto"  # mid-block kernel: splash (TPU), cudnn (GPU, half precision), else flash
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default
BATCH_NHWC = ("batch", None, None, None)
Padding = tuple[tuple[int, int], tuple[int, int]]


# ---- math ------------------------------------------------------------------------------------------
def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """NHWC × HWIO convolution + bias, accumulated in fp32, result in x's dtype."""
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=F32)
    return (y + bias.astype(F32)).astype(x.dtype)


def rms_norm(x: jax.Array, gamma: jax.Array) -> jax.Array:
    """diffusers' `QwenImageRMS_norm`: `F.normalize(x, dim=C) · √C · γ`, the L2 step in fp32."""
    xf = x.astype(F32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    y = (xf / jnp.maximum(norm, NORM_EPS)).astype(x.dtype)
    return y * math.sqrt(x.shape[-1]) * gamma.astype(x.dtype)


def upsample_nearest2x(x: jax.Array) -> jax.Array:
    """Nearest ×2 along H and W (torch 'nearest-exact' at an integer factor)."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def normalize_latents(z: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """`(z − mean) / std` per channel (last axis), in fp32: what the pipelines feed the DiT."""
    return (z.astype(F32) - jnp.asarray(mean, F32)) / jnp.asarray(std, F32)


def denormalize_latents(z: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """Inverse of `normalize_latents`: `z · std + mean`, in fp32."""
    return z.astype(F32) * jnp.asarray(std, F32) + jnp.asarray(mean, F32)


# ---- modules (hold parameters, call the math) --------------------------------------------------------
class Conv(nnx.Module):
    """A 2D conv: `kernel` HWIO (torch OIHW transposed; causal 3D kernels use their last time tap)."""

    def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, padding: Padding | None = None,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        std = 1.0 / math.sqrt(cin * k * k)
        self.kernel = nnx.Param((jax.random.normal(rngs.params(), (k, k, cin, cout), F32) * std).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))
        self.stride = stride
        self.padding = padding if padding is not None else ((k // 2, k // 2), (k // 2, k // 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv2d(x, self.kernel[...], self.bias[...], self.stride, self.padding)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, dtype: jnp.dtype):
        self.gamma = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.gamma[...])


class ResidualBlock(nnx.Module):
    """norm → SiLU → conv3×3 → norm → SiLU → conv3×3, plus a 1×1 shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(in_dim, dtype=dtype)
        self.conv1 = Conv(in_dim, out_dim, 3, dtype=dtype, rngs=rngs)
        self.norm2 = RMSNorm(out_dim, dtype=dtype)
        self.conv2 = Conv(out_dim, out_dim, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = Conv(in_dim, out_dim, 1, dtype=dtype, rngs=rngs) if in_dim != out_dim else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)))
        x = self.conv2(jax.nn.silu(self.norm2(x)))
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all H·W positions, width = channels (384 in the mid-blocks).

    `attention` names a kernel of `models.kernels` ('chunked' keeps 1024² images at 16,384 tokens
    from materialising the 1 GiB score matrix; 'xla' materialises it).
    """

    def __init__(self, dim: int, *, attention: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, dtype=dtype)
        self.to_qkv = Conv(dim, 3 * dim, 1, dtype=dtype, rngs=rngs)
        self.proj = Conv(dim, dim, 1, dtype=dtype, rngs=rngs)
        self.attention = attention

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, h * w, 3, 1, c)  # channels [q | k | v], one head
        out = get_attention(self.attention)(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None)
        return self.proj(out.reshape(b, h, w, c)) + x


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, attention: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, attention=attention, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Resample(nnx.Module):
    """Spatial ×½ (pad right/bottom by 1, 3×3 stride-2 conv) or ×2 (nearest, 3×3 conv to dim/2).

    diffusers' '…3d' modes add a `time_conv` that never runs on a first (single-frame) chunk, so it
    has no counterpart here; its weights are accepted and skipped by the loader.
    """

    def __init__(self, dim: int, mode: str, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.mode = mode
        if mode.startswith("downsample"):
            self.resample = Conv(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
        elif mode.startswith("upsample"):
            self.resample = Conv(dim, dim // 2, 3, dtype=dtype, rngs=rngs)
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resample(upsample_nearest2x(x) if self.mode.startswith("upsample") else x)


class Encoder(nnx.Module):
    """`QwenImageEncoder3d` on one frame: conv_in → down_blocks → mid_block → norm_out/SiLU → conv_out."""

    def __init__(self, cfg: VAEConfig, *, attention: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = Conv(cfg.input_channels, dims[0], 3, dtype=dtype, rngs=rngs)
        blocks: list[nnx.Module] = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode, dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], attention=attention, dtype=dtype, rngs=rngs)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = Conv(dims[-1], 2 * cfg.z_dim, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class UpBlock(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, dtype=dtype, rngs=rngs) for a, b in pairwise(dims)])
        self.upsamplers = (nnx.List([Resample(out_dim, upsample_mode, dtype=dtype, rngs=rngs)])
                           if upsample_mode else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nnx.Module):
    """`QwenImageDecoder3d` on one frame: conv_in → mid_block → up_blocks → norm_out/SiLU → conv_out."""

    def __init__(self, cfg: VAEConfig, *, attention: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = Conv(cfg.z_dim, dims[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(dims[0], attention=attention, dtype=dtype, rngs=rngs)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(pairwise(dims)):
            in_dim = in_dim // 2 if i > 0 else in_dim  # the previous upsampler halved the width
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = Conv(dims[-1], cfg.input_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKLQwenImage(nnx.Module):
    """diffusers' `AutoencoderKLQwenImage` for single images (NHWC inside).

    `encode` returns the posterior's mode (the mean half of `quant_conv`'s output, unnormalised);
    `decode` applies `post_quant_conv` first and clamps to [-1, 1], as diffusers' `_decode` does.
    """

    def __init__(self, config: VAEConfig, *, attention: str = DEFAULT_ATTENTION, dtype: jnp.dtype = F32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        z = config.z_dim
        self.config = config
        self.encoder = Encoder(config, attention=attention, dtype=dtype, rngs=rngs)
        self.quant_conv = Conv(2 * z, 2 * z, 1, dtype=dtype, rngs=rngs)
        self.post_quant_conv = Conv(z, z, 1, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, attention=attention, dtype=dtype, rngs=rngs)

    @property
    def dtype(self) -> jnp.dtype:
        return self.quant_conv.kernel[...].dtype

    def encode(self, x: jax.Array) -> jax.Array:
        """Images NHWC [B, H, W, C] → posterior mode [B, H/8, W/8, z_dim] (raw, not normalised)."""
        x = constrain(x.astype(self.dtype), BATCH_NHWC)
        moments = self.quant_conv(self.encoder(x))
        return constrain(moments[..., : self.config.z_dim], BATCH_NHWC)

    def decode(self, z: jax.Array) -> jax.Array:
        """Raw latents NHWC [B, h, w, z_dim] → images NHWC [B, 8h, 8w, C], clamped to [-1, 1]."""
        z = constrain(z.astype(self.dtype), BATCH_NHWC)
        x = self.decoder(self.post_quant_conv(z))
        return constrain(jnp.clip(x, -1.0, 1.0), BATCH_NHWC)


def encode_images(model: AutoencoderKLQwenImage, images: jax.Array, normalize: bool = True) -> jax.Array:
    """Channels-first images [B, C, H, W] in [-1, 1] → latents [B, z, H/8, W/8] (fp32).

    With `normalize` (the pipelines' convention): `(mode − latents_mean) / latents_std`.
    """
    z = model.encode(jnp.transpose(images, (0, 2, 3, 1)))
    cfg = model.config
    z = normalize_latents(z, cfg.latents_mean, cfg.latents_std) if normalize else z.astype(F32)
    return jnp.transpose(z, (0, 3, 1, 2))


def decode_latents(model: AutoencoderKLQwenImage, latents: jax.Array, normalized: bool = True) -> jax.Array:
    """Latents [B, z, h, w] (normalised unless `normalized=False`) → images [B, C, 8h, 8w] in [-1, 1] (fp32)."""
    z = jnp.transpose(latents, (0, 2, 3, 1))
    cfg = model.config
    if normalized:
        z = denormalize_latents(z, cfg.latents_mean, cfg.latents_std)
    return jnp.transpose(model.decode(z), (0, 3, 1, 2)).astype(F32)
