"""Constructing `QwenImageTransformer`: abstract (shapes only), random, or just its fresh LoRA adapters."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from ...config import DiTConfig, ModelOptions
from .layers import ADAPTER_STATE, Linear
from .transformer import QwenImageTransformer


def abstract_model(config: DiTConfig, options: ModelOptions | None = None) -> QwenImageTransformer:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory, for shapes, sharding plans, restore targets."""
    return nnx.eval_shape(lambda: QwenImageTransformer(config, options or ModelOptions(), rngs=nnx.Rngs(0)))


def init_transformer(config: DiTConfig, options: ModelOptions | None = None, seed: int = 0) -> QwenImageTransformer:
    """A randomly initialised model (tests, demos)."""
    return QwenImageTransformer(config, options or ModelOptions(), rngs=nnx.Rngs(seed))


def fresh_lora_state(config: DiTConfig, options: ModelOptions, seed: int = 0) -> nnx.State:
    """Fresh adapters only (A random, B zero; DoRA magnitudes from the random base, see `init_dora_magnitudes`;
    per-layer `LoraTable`s). Trace it under `jax.jit`: the base-weight initialisation is then dead code that
    XLA removes, and `out_shardings` places the result."""
    return nnx.state(QwenImageTransformer(config, options, rngs=nnx.Rngs(seed)), ADAPTER_STATE)


def init_dora_magnitudes(model: QwenImageTransformer) -> None:
    """Set every DoRA magnitude to ‖W‖ per output of the model's current base weights (PEFT's initial value while
    B is zero), so that the adapted model equals the base: call it after loading base weights."""
    for path, mod in nnx.iter_graph(model):
        if isinstance(mod, Linear) and mod.lora_type == "dora" and mod.has_lora:
            stacked = bool(path) and path[0] == "transformer_blocks"
            old = mod.lora_magnitude[...]
            norms = _row_norms(mod.kernel[...], axis=1 if stacked else 0)
            mod.lora_magnitude.set_value(jax.device_put(norms, old.sharding) if hasattr(old, "sharding") else norms)


@partial(jax.jit, static_argnames="axis")
def _row_norms(kernel: jax.Array, axis: int) -> jax.Array:
    w = kernel.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=axis))


__all__ = ["abstract_model", "fresh_lora_state", "init_dora_magnitudes", "init_transformer"]
