"""Building blocks shared by the vision tower and the language model (names mirror transformers).

Numerics follow transformers: matmuls accumulate in fp32 and round to the activation dtype;
RMSNorm normalises in fp32, rounds to the input dtype, then scales by the weight; softmax in fp32.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..quant import quantize
from .config import EncoderOptions

F32 = jnp.float32


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype) -> jax.Array:
    return (jax.random.normal(rngs.params(), tuple(shape), F32) * std).astype(dtype)


class Linear(nnx.Module):
    """`y = x @ kernel + bias`; kernel `[in, *out]` is the torch weight transposed.

    `out` may be a tuple (the vision `qkv` kernel is `[in, 3, D]` so the head axis can be split
    without mixing q, k and v). `axes` are the logical sharding names of the kernel's axes.

    Quantized (`options.quantize` and `quantizable`): `kernel` holds int8 / fp8 values and
    `kernel_scale` `[1, *out]` the fp32 per-output-channel scales (sharded like the bias);
    `y = (x @ kernel)·scale + bias`, the scale applied to the fp32 accumulator (`models/quant.py`).
    """

    def __init__(self, in_features: int, out_features: int | Sequence[int], *, axes: Sequence[str | None],
                 options: EncoderOptions, rngs: nnx.Rngs, bias: bool = True, quantizable: bool = True):
        out = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        axes = tuple(axes)
        assert len(axes) == 1 + len(out), (axes, out)
        self.dtype = options.dtype
        self.quantized = bool(options.quantize) and quantizable
        std = 1 / math.sqrt(in_features)
        if self.quantized:
            q, s = quantize(_normal(rngs, (in_features, *out), std, F32), options.quantize, axis=0)
            self.kernel = nnx.Param(q, out_sharding=axes)
            self.kernel_scale = nnx.Param(s, out_sharding=(None, *axes[1:]))
        else:
            self.kernel = nnx.Param(_normal(rngs, (in_features, *out), std, options.param_dtype), out_sharding=axes)
        self.bias = nnx.Param(_normal(rngs, out, 0.02, options.param_dtype), out_sharding=axes[1:]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=F32)
        if self.quantized:  # per-output-channel scale commutes with the contraction over `in`
            y = y * self.kernel_scale[...][0]
        if self.bias is not None:
            y = y + self.bias[...].astype(F32)
        return y.astype(self.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`Qwen2_5_VLRMSNorm`: normalise in fp32, round to the input dtype, multiply by the weight."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight * y.astype(x.dtype)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, options: EncoderOptions, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = nnx.Param((1 + _normal(rngs, (dim,), 0.02, F32)).astype(options.param_dtype),
                                out_sharding=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...].astype(x.dtype), self.eps)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """transformers' `ACT2FN` for the activations Qwen configs use."""
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    }[name]


class MLP(nnx.Module):
    """SwiGLU: `down_proj(act(gate_proj(x)) * up_proj(x))` (vision: with biases; text: without)."""

    def __init__(self, dim: int, hidden: int, act: str, *, bias: bool, options: EncoderOptions, rngs: nnx.Rngs):
        kw = dict(options=options, rngs=rngs, bias=bias)
        self.gate_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(hidden, dim, axes=("mlp", "embed"), **kw)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x·cos + rotate_half(x)·sin` in the dtype of cos/sin, rounded back to x's dtype."""
    xc = x.astype(cos.dtype)
    return (xc * cos + rotate_half(xc) * sin).astype(x.dtype)


def stack_layers(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """`n` copies of a module with every parameter stacked on a leading 'layers' axis (for scan)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return build(rngs)


def scan_layers(layers: nnx.Module, body: Callable, carry, xs=None, *, remat: bool = False):
    """Run `body(layer, carry, x) -> carry` over the stacked layers with `jax.lax.scan`."""
    graphdef, state = nnx.split(layers)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x), None

    if remat:
        step = jax.checkpoint(step)
    carry, _ = jax.lax.scan(step, carry, (state, xs))
    return carry
