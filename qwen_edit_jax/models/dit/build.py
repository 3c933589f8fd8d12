"""Constructing `QwenImageTransformer`: abstract (shapes only), random, or just its fresh LoRA adapters."""

from __future__ import annotations

from flax import nnx

from ...config import DiTConfig, ModelOptions
from .transformer import QwenImageTransformer


def abstract_model(config: DiTConfig, options: ModelOptions | None = None) -> QwenImageTransformer:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory, for shapes, sharding plans, restore targets."""
    return nnx.eval_shape(lambda: QwenImageTransformer(config, options or ModelOptions(), rngs=nnx.Rngs(0)))


def init_transformer(config: DiTConfig, options: ModelOptions | None = None, seed: int = 0) -> QwenImageTransformer:
    """A randomly initialised model (tests, demos)."""
    return QwenImageTransformer(config, options or ModelOptions(), rngs=nnx.Rngs(seed))


def fresh_lora_state(config: DiTConfig, options: ModelOptions, seed: int = 0) -> nnx.State:
    """Fresh LoRA parameters only (A random, B zero). Trace it under `jax.jit`: the base-weight
    initialisation is then dead code that XLA removes, and `out_shardings` places the result."""
    return nnx.state(QwenImageTransformer(config, options, rngs=nnx.Rngs(seed)), nnx.LoRAParam)


__all__ = ["abstract_model", "fresh_lora_state", "init_transformer"]
