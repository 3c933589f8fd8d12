"""Small building blocks: a LoRA-capable linear, norms, modulation, timestep embedding, MLP.

Numerics follow diffusers: matmuls accumulate in fp32 and round to the activation dtype; RMSNorm
and LayerNorm compute in fp32 (eps 1e-6); the timestep sinusoid is fp32; GELU is the tanh form.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
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


class LoraTable(nnx.Variable):
    """Non-trainable per-layer adapter data (rank masks, scales), stacked and scanned with the layer like the
    weights; built from `LoraConfig.plan`, never read from a checkpoint."""


ADAPTER_STATE = nnx.Any(nnx.LoRAParam, LoraTable)  # everything `fresh_lora_state` builds


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS `factorization(dimension, factor)` (lycoris/functional/general.py): (m, n), m ≤ n, m·n = dimension,
    m the divisor closest to `factor` (-1: the most balanced split)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lokr_apply(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """kron(w1, w2)·x without the Kronecker product: x `[..., m·n]` as X `[..., m, n]`, then w1·X·w2ᵀ, fp32.

    w1 `[l, m]`, w2 `[k, n]` (torch layout: kron(w1, w2) is the `[l·k, m·n]` weight) → `[..., l·k]`.
    """
    xm = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
    t = jax.lax.dot_general(xm, w2, (((xm.ndim - 1,), (1,)), ((), ())), preferred_element_type=F32)  # [..., m, k]
    t = t.astype(x.dtype)
    y = jnp.einsum("lm,...mk->...lk", w1, t, preferred_element_type=F32)
    return y.reshape(*x.shape[:-1], w1.shape[0] * w2.shape[0])


def dora_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """‖W + s·(A·B)‖ over the input axis, per output, without forming W + s·A·B (fp32).

    kernel `[in, G, out]`, A `[G, in, r]`, B `[G, r, out]`, scale `[G]`: ‖w‖² + 2s⟨w, AB⟩ + s²‖AB‖² with
    ⟨w, AB⟩ = Σ_r (AᵀW)·B (r·in·out) and ‖AB‖² = Bᵀ(AᵀA)B. Returns `[G, out]`.
    """
    hi = jax.lax.Precision.HIGHEST
    w = kernel.astype(F32)
    sq = jnp.sum(w * w, axis=0)  # [G, out]
    atw = jnp.einsum("gir,igo->gro", a, w, precision=hi)
    cross = jnp.sum(atw * b, axis=1)
    ata = jnp.einsum("gir,gis->grs", a, a, precision=hi)
    quad = jnp.sum(jnp.einsum("grs,gso->gro", ata, b, precision=hi) * b, axis=1)
    s = scale[:, None]
    return jnp.sqrt(jnp.maximum(sq + 2 * s * cross + s * s * quad, 0.0))


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel `[in, *out]` (torch weight transposed), optional adapter.

    `out` may be a tuple: the fused QKV projections use `(3, inner_dim)` so that q, k and v are
    separate slices of one matmul and the head axis can be sharded without resharding.

    Adapters (when `options.lora` targets `name`), all `nnx.LoRAParam` kept in fp32:
    - "lora": `y += scale · (x @ A) @ B`, A random, B zero. For a fused QKV projection,
      `qkv_mode="split"` holds one adapter per q/k/v slice (A `[3, in, r]`, B `[3, r, inner]`),
      `"shared"` one A (`[in, r]`) and B `[r, 3, inner]`.
    - "dora": the same A, B plus `lora_magnitude` m (shape `out`, initialised to the kernel's norm per
      output): `y = m/‖W + s·AB‖ · (x@W + s·(x@A)@B) + bias`, the norm detached (PEFT).
    - "lokr": `lokr_w1` `[l, m]` and `lokr_w2` `[k, n]` (or `lokr_w2_a` `[k, r]`, `lokr_w2_b` `[r, n]` when
      r < max(k, n)/2), torch layout, a leading q/k/v axis on the fused projections; ΔW = scale·kron(w1, w2),
      scale = alpha/r only when w2 is decomposed (LyCORIS); w2 (or w2_b) starts at zero.
    With `LoraConfig.plan` (include / exclude / rank_pattern / alpha_pattern), the adapter has the largest
    rank of its layers; `lora_layer_scale` (`[slots]`, 0 where a layer has no adapter) and `lora_mask`
    (`[slots, r]`, only where ranks differ) are `LoraTable`s taken per layer from the plan (`layer`).

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
        layer: jax.Array | None = None,
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
        self.lora_type = "lora"
        self.lora_tables = False
        self.lora_scale_base = 1.0  # the adapter's own scale (alpha/rank); LoKr: 1 unless w2 is decomposed
        self.custom_grads = options.custom_grads
        lora = options.lora
        if lora is not None and name and lora.targets_module(name):
            self._init_adapter(lora, in_features, out_shape, axes, kernel, rngs, name, layer)

    def _init_adapter(self, lora, in_features, out_shape, axes, kernel, rngs, name, layer) -> None:
        grouped = len(out_shape) == 2 and lora.qkv_mode == "split"
        slots = out_shape[0] if grouped else 1
        plan = lora.plan_for(name)
        if plan is None:
            r, scales, ranks = lora.rank, None, None
        else:
            ranks = np.asarray(plan[0], np.int64).reshape(-1, slots) if plan[0] else np.zeros((1, slots), np.int64)
            alphas = np.asarray(plan[1], np.float64).reshape(-1, slots) if plan[1] else np.zeros((1, slots))
            r = int(ranks.max())
            if r == 0:
                return
            scales = np.where(ranks > 0, alphas / np.maximum(ranks, 1), 0.0)
        self.lora_grouped, self.lora_type = grouped, lora.type
        if lora.type == "lokr":
            self._init_lokr(lora, r, in_features, out_shape, grouped, rngs)
        else:
            bound = 1.0 / math.sqrt(in_features)  # PEFT's kaiming_uniform(a=√5) bound
            if grouped:
                g = out_shape[0]
                a_shape, a_axes = (g, in_features, r), (None, axes[0], None)
                b_shape, b_axes = (g, r, out_shape[1]), (None, None, axes[-1])
            else:
                a_shape, a_axes = (in_features, r), (axes[0], None)
                b_shape, b_axes = (r, *out_shape), (None, *axes[1:])
            a = jax.random.uniform(rngs.params(), a_shape, F32, -bound, bound)
            self.lora_A = nnx.LoRAParam(a, out_sharding=a_axes)
            self.lora_B = nnx.LoRAParam(jnp.zeros(b_shape, F32), out_sharding=b_axes)
            self.lora_scale_base = float(lora.scale)
            if lora.type == "dora":  # ‖W‖ per output: the model is unchanged at init
                self.lora_magnitude = nnx.LoRAParam(jnp.sqrt(jnp.sum(kernel * kernel, axis=0)), out_sharding=axes[1:])
        if scales is None:
            self.lora_scale = float(self.lora_scale_base)
            return
        if lora.type == "lokr":
            scales = np.where(ranks > 0, self.lora_scale_base, 0.0)
        if bool(np.all(ranks == r)) and len(set(scales.ravel().tolist())) == 1:
            self.lora_scale = float(scales.ravel()[0])
            return
        if layer is None:
            raise ValueError(f"adapter plan of {name} varies per layer but the linear has no layer index")
        self.lora_scale = 1.0  # the per-layer tables carry the scale
        self.lora_tables = True
        self.lora_layer_scale = LoraTable(jnp.asarray(scales, F32)[layer], out_sharding=(None,))
        if lora.type != "lokr" and not np.all(ranks[ranks > 0] == r):
            mask = (np.arange(r)[None, None, :] < ranks[:, :, None]).astype(np.float32)
            self.lora_mask = LoraTable(jnp.asarray(mask)[layer], out_sharding=(None, None))

    def _init_lokr(self, lora, r, in_features, out_shape, grouped, rngs) -> None:
        out_dim = out_shape[-1] if grouped else int(np.prod(out_shape))
        g = (out_shape[0],) if grouped else ()
        in_m, in_n = lokr_factorization(in_features, lora.lokr_factor)
        out_l, out_k = lokr_factorization(out_dim, lora.lokr_factor)
        def rep(*shape: int) -> tuple[None, ...]:  # small factors: replicated
            return (None,) * (len(g) + len(shape))

        # kaiming_uniform(a=√5) on a [rows, cols] tensor: bound 1/√cols (LyCORIS's init)
        w1 = jax.random.uniform(rngs.params(), (*g, out_l, in_m), F32, -1, 1) / math.sqrt(in_m)
        self.lokr_w1 = nnx.LoRAParam(w1, out_sharding=rep(out_l, in_m))
        if r < max(out_k, in_n) / 2:
            w2a = jax.random.uniform(rngs.params(), (*g, out_k, r), F32, -1, 1) / math.sqrt(r)
            self.lokr_w2_a = nnx.LoRAParam(w2a, out_sharding=rep(out_k, r))
            self.lokr_w2_b = nnx.LoRAParam(jnp.zeros((*g, r, in_n), F32), out_sharding=rep(r, in_n))
            self.lora_scale_base = (lora.alpha if lora.alpha is not None else r) / r
        else:
            self.lokr_w2 = nnx.LoRAParam(jnp.zeros((*g, out_k, in_n), F32), out_sharding=rep(out_k, in_n))
            self.lora_scale_base = 1.0

    @property
    def has_lora(self) -> bool:
        return self.lora_scale != 0.0

    def _slot_scale(self) -> jax.Array | float:
        return self.lora_layer_scale[...] if self.lora_tables else self.lora_scale

    def _lora_ab(self) -> tuple[jax.Array, jax.Array]:
        """A and B in fp32 with the per-layer rank mask applied to A's columns (and B's rows)."""
        a, b = self.lora_A[...], self.lora_B[...]
        mask = getattr(self, "lora_mask", None)
        if mask is not None:
            m = mask[...]  # [slots, r]
            if self.lora_grouped:
                a, b = a * m[:, None, :], b * m[:, :, None]
            else:
                a, b = a * m[0], b * m[0].reshape((-1,) + (1,) * (b.ndim - 1))
        return a, b

    def _adapter_delta(self, x: jax.Array, a: jax.Array | None, b: jax.Array | None, y_shape) -> jax.Array:
        """The adapter's unscaled ΔW·x, `[..., *out]` in fp32."""
        if self.lora_type == "lokr":
            w1 = self.lokr_w1[...]
            w2 = self.lokr_w2[...] if hasattr(self, "lokr_w2") else jnp.matmul(
                self.lokr_w2_a[...], self.lokr_w2_b[...], precision=jax.lax.Precision.HIGHEST)
            w1, w2 = w1.astype(self.dtype), w2.astype(self.dtype)
            if self.lora_grouped:
                return jnp.stack([lokr_apply(x, w1[g], w2[g]) for g in range(w1.shape[0])], axis=-2)
            return lokr_apply(x, w1, w2).reshape(y_shape)
        a, b = a.astype(self.dtype), b.astype(self.dtype)
        product = lora_delta if "lora" in custom_grads(self.custom_grads) else lora_product
        if self.lora_grouped:  # one adapter per q/k/v slice: [..., 3, inner]
            return jnp.stack([product(x, a[g], b[g]) for g in range(a.shape[0])], axis=-2)
        return product(x, a, b.reshape(b.shape[0], -1)).reshape(y_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...]
        scale = self.kernel_scale[...] if self.quantized else None
        if scale is not None and scale.shape[0] > 1:  # per-group scales: dequantize this layer's kernel
            kernel, scale = dequantize(kernel, scale, self.dtype, axis=0), None
        y = _dense(x, kernel.astype(self.dtype))
        if scale is not None:  # a per-output-channel scale commutes with the contraction over `in`
            y = y * scale[0]
        bias = self.bias[...].astype(F32)
        if not self.has_lora:
            return checkpoint_name((y + bias).astype(self.dtype), MATMUL_CHECKPOINT_NAME)
        a, b = self._lora_ab() if self.lora_type != "lokr" else (None, None)
        delta = self._adapter_delta(x, a, b, y.shape)
        s = self._slot_scale()
        if self.lora_tables and self.lora_grouped:
            delta = delta * s[:, None]
        elif self.lora_tables:
            delta = delta * s[0]
        else:
            delta = delta * s
        if self.lora_type == "dora":
            y = self._dora_factor(kernel, a, b, s) * (y + delta)
        else:
            y = y + delta
        return checkpoint_name((y + bias).astype(self.dtype), MATMUL_CHECKPOINT_NAME)

    def _dora_factor(self, kernel: jax.Array, a: jax.Array, b: jax.Array, s: jax.Array | float) -> jax.Array:
        """m / ‖W + s·AB‖ (detached norm) per output, shape `out`; 1 in layers without an adapter."""
        out_shape = kernel.shape[1:]
        if self.lora_grouped:
            k3, a3, b3 = kernel, a, b
        else:
            k3 = kernel.reshape(kernel.shape[0], 1, -1)
            a3, b3 = a[None], b.reshape(1, b.shape[0], -1)
        s_vec = jnp.broadcast_to(jnp.asarray(s, F32).reshape(-1), (k3.shape[1],))
        norm = jax.lax.stop_gradient(dora_norm(k3, a3.astype(F32), b3.astype(F32), s_vec)).reshape(out_shape)
        factor = self.lora_magnitude[...] / norm
        if self.lora_tables:
            on = (s_vec > 0).reshape((-1,) + (1,) * (len(out_shape) - 1)) if self.lora_grouped else s_vec[0] > 0
            factor = jnp.where(on, factor, 1.0)
        return factor


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

    def __init__(self, dim: int, *, options: ModelOptions, rngs: nnx.Rngs, name: str, layer: jax.Array | None = None):
        lin = {"options": options, "rngs": rngs, "layer": layer}
        self.fc1 = Linear(dim, 4 * dim, axes=("embed", "mlp"), name=f"{name}.fc1", **lin)
        self.fc2 = Linear(4 * dim, dim, axes=("mlp", "embed"), name=f"{name}.fc2", **lin)
        self.custom_grads = options.custom_grads

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x), "gelu" in custom_grads(self.custom_grads)))
