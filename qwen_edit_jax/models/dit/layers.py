"""Small building blocks: a LoRA-capable linear, norms, modulation, timestep embedding, MLP.

Numerics follow diffusers: matmuls accumulate in fp32 and round to the activation dtype; RMSNorm
and LayerNorm compute in fp32 (eps 1e-6); the timestep sinusoid is fp32; GELU is the tanh form.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ...config import ModelOptions
from ...parallel.mesh import current_mesh
from ..kernels.platform import platform_of
from ..quant import dequantize, quantize

EPS = 1e-6
F32 = jnp.float32

# Name given to every linear output so the "save_matmuls" remat policy can keep exactly these.
MATMUL_CHECKPOINT_NAME = "linear_out"


def _dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x[..., in] · kernel[in, *out] → [..., *out] in fp32 (bf16 inputs stay bf16 on the MXU)."""
    return jax.lax.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=F32
    )


def _matmul_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """aᵀ·b for `[T, m]`, `[T, n]` → `[m, n]` in fp32, with aᵀ (the narrow one) materialised first.

    XLA:CPU otherwise folds the transpose into the dot and then copies the wide `[T, n]` operand
    into column-major order (the LoRA weight gradients cost 2–3× their matmul that way). The
    optimization barrier keeps the small `[m, T]` copy as the operand of a plain `[m, T]·[T, n]`.
    """
    return jnp.matmul(jax.lax.optimization_barrier(a.T), b, preferred_element_type=F32)


# The written-out backward passes that `custom_grads="auto"` uses per platform (the mesh's when AOT-compiling for
# a TPU on a CPU host). They were written for XLA:CPU, where they cut the step's bytes and peak. Compiled for TPU
# the GELU derivative costs nothing (a little less peak), the LoRA VJP adds copies on v6e: TPU keeps "gelu" only.
# GPUs (unmeasured) use autodiff. benchmarks/autodiff_variants.py; measured in docs/training.md.
CUSTOM_GRADS_BY_PLATFORM: dict[str, frozenset[str]] = {
    "cpu": frozenset({"lora", "gelu"}),
    "tpu": frozenset({"gelu"}),
}


def custom_grads(choice: str | tuple[str, ...] = "auto", platform: str | None = None) -> frozenset[str]:
    """The written-out backward passes in use: `choice` (`ModelOptions.custom_grads`), or for "auto" those of
    `platform` (default: the platform being traced for) in `CUSTOM_GRADS_BY_PLATFORM`."""
    if choice != "auto":
        return frozenset(choice)
    return CUSTOM_GRADS_BY_PLATFORM.get(platform or platform_of(current_mesh()), frozenset())


def lora_product(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`(x·A)·B` as `lora_delta` computes it, differentiated by autodiff."""
    return _lora_fwd(x, a, b)[0]


@jax.custom_vjp
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`(x·A)·B` for x `[..., in]`, A `[in, r]`, B `[r, out]`, fp32 result; `x·A` rounds to x's dtype.

    The backward is written out so that every product is a plain matmul on XLA:CPU (`_matmul_t`). Used where
    `custom_grads` includes "lora"; elsewhere `lora_product` (the same forward under autodiff).
    """
    return _lora_fwd(x, a, b)[0]


def _lora_fwd(x: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple]:
    xa = _dense(x, a).astype(x.dtype)
    return _dense(xa, b), (x, a, b, xa)


def _lora_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, a, b, xa = res
    x2, xa2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, xa.shape[-1])
    g2 = g.reshape(-1, g.shape[-1]).astype(x.dtype)
    gb = jax.lax.dot_general(g2, b, (((1,), (1,)), ((), ())), preferred_element_type=F32).astype(x.dtype)  # [T, r]
    dx = jax.lax.dot_general(gb, a, (((1,), (1,)), ((), ())), preferred_element_type=F32)  # [T, in]
    da = _matmul_t(gb, x2).T  # [in, r]
    db = _matmul_t(xa2, g2)  # [r, out]
    return dx.reshape(x.shape).astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_fwd, _lora_bwd)


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel `[in, *out]` (torch weight transposed), optional LoRA.

    `out` may be a tuple: the fused QKV projections use `(3, inner_dim)` so that q, k and v are
    separate slices of one matmul and the head axis can be sharded without resharding.

    LoRA (when `options.lora` targets `name`): `y += scale · (x @ A) @ B`, A random, B zero, both
    `nnx.LoRAParam` kept in fp32. For a fused QKV projection, `qkv_mode="split"` holds one
    adapter per q/k/v slice (A `[3, in, r]`, B `[3, r, inner]`), `"shared"` one A (`[in, r]`) and
    B `[r, 3, inner]`.

    Quantized base (`options.quantize`, named linears = the transformer blocks' ones): `kernel` holds
    int8 / fp8 / int4 values and `kernel_scale` `[groups, *out]` the fp32 scales (both plain `nnx.Param`,
    so frozen base). One group (int8 / fp8): `y = (x @ kernel)·scale + bias`; several (int4): the kernel
    is dequantized to the activation dtype before the matmul (`models/quant.py`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        *,
        axes: Sequence[str | None],
        options: ModelOptions,
        rngs: nnx.Rngs,
        name: str = "",
    ):
        out_shape = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        axes = tuple(axes)
        assert len(axes) == 1 + len(out_shape), (axes, out_shape)
        self.dtype = options.dtype
        std = 1.0 / math.sqrt(in_features)
        kernel = jax.random.normal(rngs.params(), (in_features, *out_shape), F32) * std
        self.quantized = bool(options.quantize) and bool(name)
        if self.quantized:
            q, s = quantize(kernel, options.quantize, axis=0)
            self.kernel = nnx.Param(q, out_sharding=axes)
            self.kernel_scale = nnx.Param(s, out_sharding=(None, *axes[1:]))
        else:
            self.kernel = nnx.Param(kernel.astype(options.param_dtype), out_sharding=axes)
        self.bias = nnx.Param(jnp.zeros(out_shape, options.param_dtype), out_sharding=axes[1:])
        self.lora_scale = 0.0
        self.lora_grouped = False
        self.custom_grads = options.custom_grads
        lora = options.lora
        if lora is not None and name and lora.targets_module(name):
            r = lora.rank
            bound = 1.0 / math.sqrt(in_features)  # PEFT's kaiming_uniform(a=√5) bound
            self.lora_scale = float(lora.scale)
            self.lora_grouped = len(out_shape) == 2 and lora.qkv_mode == "split"
            if self.lora_grouped:
                g = out_shape[0]
                a_shape, a_axes = (g, in_features, r), (None, axes[0], None)
                b_shape, b_axes = (g, r, out_shape[1]), (None, None, axes[-1])
            else:
                a_shape, a_axes = (in_features, r), (axes[0], None)
                b_shape, b_axes = (r, *out_shape), (None, *axes[1:])
            a = jax.random.uniform(rngs.params(), a_shape, F32, -bound, bound)
            self.lora_A = nnx.LoRAParam(a, out_sharding=a_axes)
            self.lora_B = nnx.LoRAParam(jnp.zeros(b_shape, F32), out_sharding=b_axes)

    @property
    def has_lora(self) -> bool:
        return self.lora_scale != 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...]
        scale = self.kernel_scale[...] if self.quantized else None
        if scale is not None and scale.shape[0] > 1:  # per-group scales: dequantize this layer's kernel
            kernel, scale = dequantize(kernel, scale, self.dtype, axis=0), None
        y = _dense(x, kernel.astype(self.dtype))
        if scale is not None:  # a per-output-channel scale commutes with the contraction over `in`
            y = y * scale[0]
        y = y + self.bias[...].astype(F32)
        if self.has_lora:
            a = self.lora_A[...].astype(self.dtype)
            b = self.lora_B[...].astype(self.dtype)
            product = lora_delta if "lora" in custom_grads(self.custom_grads) else lora_product
            if self.lora_grouped:  # one adapter per q/k/v slice: [..., 3, inner]
                delta = jnp.stack([product(x, a[g], b[g]) for g in range(a.shape[0])], axis=-2)
            else:
                delta = product(x, a, b.reshape(b.shape[0], -1)).reshape(y.shape)
            y = y + self.lora_scale * delta
        return checkpoint_name(y.astype(self.dtype), MATMUL_CHECKPOINT_NAME)


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float = EPS) -> jax.Array:
    """diffusers RMSNorm: normalise in fp32, round to the weight dtype, then scale."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is None:
        return y.astype(x.dtype)
    return (y.astype(weight.dtype) * weight).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, options: ModelOptions, axes: tuple[str | None] = (None,)):
        self.scale = nnx.Param(jnp.ones((dim,), options.param_dtype), out_sharding=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...])


def layer_norm(x: jax.Array, eps: float = EPS) -> jax.Array:
    """LayerNorm without affine parameters, computed in fp32 (as torch does for bf16)."""
    xf = x.astype(F32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """AdaLN: `x·(1+scale)+shift`; shift/scale broadcast over tokens (`[B,1,D]` or `[B,N,D]`)."""
    return x * (1 + scale) + shift


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)` in fp32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=F32) / half)
    args = scale * (t.astype(F32)[:, None] * freqs[None, :])
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@jax.custom_jvp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """tanh-GELU `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (= `jax.nn.gelu(x, approximate=True)`).

    Its derivative is written out (`_gelu_tanh_jvp`) so that the backward keeps only `x`, not the
    four intermediates autodiff would save, and computes the gradient in one fused pass: on XLA:CPU
    the saved intermediates were read back transposed for the LoRA weight gradient (docs/training.md).
    Used where `custom_grads` includes "gelu" (`gelu`).
    """
    return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (dx,) = primals, tangents
    xf = x.astype(F32)
    t = jnp.tanh(_GELU_C * (xf + _GELU_A * xf**3))
    grad = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * xf * xf)
    return gelu_tanh(x), (grad * dx.astype(F32)).astype(dx.dtype)


def gelu(x: jax.Array, custom_grad: bool) -> jax.Array:
    """tanh-GELU: `gelu_tanh` (written-out derivative) or `jax.nn.gelu` differentiated by autodiff."""
    return gelu_tanh(x) if custom_grad else jax.nn.gelu(x, approximate=True)


class TimestepEmbedder(nnx.Module):
    """`time_text_embed.timestep_embedder`: Linear(256→D) → SiLU → Linear(D→D)."""

    def __init__(self, dim: int, *, options: ModelOptions, rngs: nnx.Rngs):
        self.linear_1 = Linear(256, dim, axes=(None, "embed"), options=options, rngs=rngs)
        self.linear_2 = Linear(dim, dim, axes=("embed", None), options=options, rngs=rngs)

    def __call__(self, sinusoid: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(sinusoid)))


class TimeTextEmbed(nnx.Module):
    """`time_text_embed` (diffusers `QwenTimestepProjEmbeddings`)."""

    def __init__(self, dim: int, *, options: ModelOptions, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedder(dim, options=options, rngs=rngs)

    def __call__(self, sigma: jax.Array) -> jax.Array:
        return self.timestep_embedder(timestep_sinusoid(sigma))


class FeedForward(nnx.Module):
    """`img_mlp` / `txt_mlp`: fc1 (D→4D, diffusers `net.0.proj`) → tanh-GELU → fc2 (`net.2`)."""

    def __init__(self, dim: int, *, options: ModelOptions, rngs: nnx.Rngs, name: str):
        self.fc1 = Linear(dim, 4 * dim, axes=("embed", "mlp"), options=options, rngs=rngs, name=f"{name}.fc1")
        self.fc2 = Linear(4 * dim, dim, axes=("mlp", "embed"), options=options, rngs=rngs, name=f"{name}.fc2")
        self.custom_grads = options.custom_grads

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x), "gelu" in custom_grads(self.custom_grads)))
