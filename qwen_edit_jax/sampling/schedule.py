"""Flow-match Euler schedule of the Qwen-Image pipelines (`FlowMatchEulerDiscreteScheduler`), bit-exact.

Shared by sampling (the sigmas of the denoising loop) and training (the σ distribution of the
objective uses the same shift and terminal stretch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
    """`FlowMatchEulerDiscreteScheduler` settings (defaults: Qwen-Image's `scheduler_config.json`)."""

    num_train_timesteps: int = 1000
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"  # or "linear"

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError(f"max_image_seq_len {self.max_image_seq_len} must exceed "
                             f"base_image_seq_len {self.base_image_seq_len}")
        if self.shift_terminal is not None and not 0.0 <= self.shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must be in [0, 1), got {self.shift_terminal}")


QWEN_IMAGE_SCHEDULER = FlowMatchConfig()


def exponential_shift(sigmas: np.ndarray, mu: float) -> np.ndarray:
    """σ ← e^μ / (e^μ + 1/σ − 1) (keeps the dtype of `sigmas`)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Rescale 1−σ so that the last σ equals `shift_terminal` (the scheduler's `stretch_shift_to_terminal`)."""
    one_minus_z = 1 - sigmas
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    return 1 - (one_minus_z / scale_factor)


def calculate_shift(image_seq_len: int, config: FlowMatchConfig = QWEN_IMAGE_SCHEDULER) -> float:
    """μ, linear in the number of *target* tokens (reference tokens are not counted), as the pipelines do."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def flow_match_sigmas(
    num_inference_steps: int,
    image_seq_len: int | None = None,
    *,
    mu: float | None = None,
    config: FlowMatchConfig = QWEN_IMAGE_SCHEDULER,
) -> np.ndarray:
    """The n+1 float32 sigmas (1 … shift_terminal, then 0) that diffusers' scheduler produces.

    Give `image_seq_len` (target tokens, (H/16)·(W/16)) or `mu` directly. The arithmetic is done
    with the same float32 numpy operations as `FlowMatchEulerDiscreteScheduler.set_timesteps`, so the
    result is bit-identical, not merely close. One exception: for a single step diffusers' terminal
    stretch divides 0 by 0 (NaN sigmas); here the stretch is skipped then, giving [1, 0].
    """
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if mu is None:
        if image_seq_len is None or image_seq_len < 1:
            raise ValueError(f"flow_match_sigmas needs image_seq_len (target tokens) >= 1 or mu; got {image_seq_len}")
        mu = calculate_shift(int(image_seq_len), config)
    sigmas = np.linspace(1.0, 1 / n, n).astype(np.float32)
    if config.time_shift_type == "exponential":
        sigmas = exponential_shift(sigmas, mu)
    else:
        sigmas = mu / (mu + (1 / sigmas - 1))
    if config.shift_terminal and n > 1:
        sigmas = stretch_to_terminal(sigmas, config.shift_terminal)
    return np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])


def model_timesteps(sigmas: np.ndarray, dtype: Any = np.float32, num_train_timesteps: int = 1000) -> np.ndarray:
    """The σ the model sees at each step: the pipelines pass `t.to(latents.dtype) / 1000` with t = σ·1000.

    In fp32 that is σ up to one rounding; in bf16 it rounds σ (0.98696 → 0.98828), which is what the
    reference pipeline feeds the model, so we replicate it. Returned as float32 values (exact in `dtype`).
    """
    dtype = np.dtype(dtype)
    t = np.asarray(sigmas[:-1], np.float32) * np.float32(num_train_timesteps)
    return (t.astype(dtype) / np.asarray(num_train_timesteps, dtype)).astype(np.float32)


def cfg_combine(cond: jax.Array, uncond: jax.Array, scale: jax.Array | float) -> jax.Array:
    """True CFG with per-token norm rescale (fp32): comb = u + s·(c − u); v = comb·‖c‖/‖comb‖ over features."""
    c, u = cond.astype(F32), uncond.astype(F32)
    comb = u + scale * (c - u)
    cond_norm = jnp.linalg.norm(c, axis=-1, keepdims=True)
    comb_norm = jnp.linalg.norm(comb, axis=-1, keepdims=True)
    return comb * (cond_norm / comb_norm)


def euler_step(latents: jax.Array, velocity: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """x ← x + (σ_next − σ)·v in fp32, cast back to the latent dtype (as `scheduler.step` does)."""
    out = latents.astype(F32) + (sigma_next - sigma) * velocity.astype(F32)
    return out.astype(latents.dtype)
