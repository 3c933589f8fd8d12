"""Flow-matching training objective and timestep samplers.

x_σ = (1−σ)·x0 + σ·ε, the model predicts v and the target is ε − x0; the loss is the MSE over the
target image's tokens only (reference-image tokens ride along clean and their outputs are
dropped), optionally weighted per sample by w(σ).

Every sampler draws an index on a 1000-point σ grid (`num_train_timesteps`):

* `diffsynth` (default): DiffSynth-Studio's Qwen-Image training schedule: σ = linspace(1, 0, n+1)[:-1],
  exponential shift with μ = 0.8, terminal stretch so the smallest σ is 0.02, uniform index, and its
  bell-shaped weight exp(−2((t−500)/1000)²) (min-shifted, mean 1 over the grid).
* `uniform` / `logit_normal`: diffusers' `compute_density_for_timestep_sampling` on the unshifted
  grid σ = (n − i)/n; no weight.
* `resolution_shift`: as `diffsynth` but μ depends on the target's token count (0.5 at 256 tokens →
  0.9 at 8192, the inference schedule's rule; musubi-tuner's `qwen_shift`).

`objective.min_timestep` / `max_timestep` keep only the grid's part with σ·1000 in that range (`restrict_timesteps`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..sampling.schedule import FlowMatchConfig, calculate_shift, exponential_shift, stretch_to_terminal
from .config import ConfigError, ObjectiveSection

F32 = jnp.float32


def resolution_mu(seq_len: int, cfg: ObjectiveSection) -> float:
    """μ linear in the number of target tokens (the Qwen-Image scheduler's dynamic shift)."""
    return calculate_shift(seq_len, FlowMatchConfig(base_shift=cfg.base_shift, max_shift=cfg.max_shift,
                                                    base_image_seq_len=cfg.base_seq_len,
                                                    max_image_seq_len=cfg.max_seq_len))


def qwen_training_sigmas(n: int, mu: float, shift_terminal: float | None) -> np.ndarray:
    """DiffSynth `set_timesteps_qwen_image(n, training=True)` sigmas, float64, descending."""
    sigmas = np.linspace(1.0, 0.0, n + 1, dtype=np.float64)[:-1]
    sigmas = exponential_shift(sigmas, mu)
    if shift_terminal is not None:
        sigmas = stretch_to_terminal(sigmas, shift_terminal)
    return sigmas


def bell_weights(sigmas: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
    """DiffSynth `set_training_weight` for a full grid: exp(−2((t−n/2)/n)²), min → 0, mean → 1."""
    n = num_train_timesteps
    t = sigmas * n
    y = np.exp(-2.0 * ((t - n / 2) / n) ** 2)
    y = y - y.min()
    return y * (len(sigmas) / y.sum())


@dataclasses.dataclass(frozen=True)
class TimestepTable:
    """The σ grid and per-index loss weights for one target size; constants in the jitted step."""

    sigmas: np.ndarray  # [n] float32, descending
    weights: np.ndarray  # [n] float32
    index_distribution: str  # "uniform" | "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


def timestep_table(cfg: ObjectiveSection, n_target_tokens: int) -> TimestepTable:
    """Build the sampler's grid for a target of `n_target_tokens` packed tokens."""
    n = cfg.num_train_timesteps
    kind = cfg.timestep_sampling
    if kind == "diffsynth":
        sigmas = qwen_training_sigmas(n, cfg.mu, cfg.shift_terminal)
    elif kind == "resolution_shift":
        sigmas = qwen_training_sigmas(n, resolution_mu(n_target_tokens, cfg), cfg.shift_terminal)
    elif kind in ("uniform", "logit_normal"):
        sigmas = np.arange(n, 0, -1, dtype=np.float64) / n  # diffusers' unshifted training grid
    else:
        raise ValueError(f"objective.timestep_sampling={kind!r}: unknown sampler")
    weighting = cfg.weighting
    if weighting == "auto":
        weighting = "bell" if kind in ("diffsynth", "resolution_shift") else "none"
    weights = bell_weights(sigmas, n) if weighting == "bell" else np.ones_like(sigmas)
    sigmas, weights = restrict_timesteps(cfg, sigmas, weights)
    return TimestepTable(
        sigmas=sigmas.astype(np.float32),
        weights=weights.astype(np.float32),
        index_distribution="logit_normal" if kind == "logit_normal" else "uniform",
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
    )


def restrict_timesteps(cfg: ObjectiveSection, sigmas: np.ndarray, weights: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The part of the grid with t = σ·num_train_timesteps in [min_timestep, max_timestep] (musubi-tuner's
    bounds), weights as on the full grid. Every sampler then draws its index over that part: uniform over
    the allowed indices, logit-normal mapped onto them (as musubi-tuner rescales t into the range)."""
    lo, hi = cfg.min_timestep, cfg.max_timestep
    if lo is None and hi is None:
        return sigmas, weights
    t = sigmas * cfg.num_train_timesteps
    keep = (t >= (-np.inf if lo is None else lo)) & (t <= (np.inf if hi is None else hi))
    if not keep.any():
        raise ConfigError(f"objective.min_timestep={lo}, objective.max_timestep={hi}: no timestep of the "
                          f"{cfg.timestep_sampling} grid (t from {t.min():.1f} to {t.max():.1f}) lies in that range")
    return sigmas[keep], weights[keep]


def sample_timesteps(key: jax.Array, batch: int, table: TimestepTable) -> tuple[jax.Array, jax.Array]:
    """Draw (σ [B], weight [B]) for a batch."""
    n = len(table.sigmas)
    if table.index_distribution == "uniform":
        idx = jax.random.randint(key, (batch,), 0, n)
    else:
        u = jax.nn.sigmoid(table.logit_mean + table.logit_std * jax.random.normal(key, (batch,), F32))
        idx = jnp.clip(jnp.floor(u * n).astype(jnp.int32), 0, n - 1)
    return jnp.asarray(table.sigmas)[idx], jnp.asarray(table.weights)[idx]


def flow_matching_loss(
    model: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    table: TimestepTable,
    img_shapes: tuple[tuple[int, int, int], ...],
    mask_min_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted flow-matching MSE on the target tokens of one micro-batch.

    `batch`: `target` [B, N, C] packed clean target latents (fp32), `references` [B, M, C] packed
    reference latents (absent or M = 0 for text-to-image), `prompt_embeds` [B, L, J],
    `prompt_mask` [B, L] bool, optionally `loss_mask` [B, N, 4] (`training.data.collate`): the
    per-sample loss is then the weighted mean Σ w·err / Σ w with w = max(mask, `mask_min_weight`) on
    every channel of the latent pixel (0 for a sample whose weights are all 0). `img_shapes`: (1, h, w)
    of the target, then of each reference.
    """
    x0 = batch["target"].astype(F32)
    b, n_target, _ = x0.shape
    k_noise, k_time = jax.random.split(key)
    noise = jax.random.normal(k_noise, x0.shape, F32)
    sigma, weight = sample_timesteps(k_time, b, table)
    s = sigma[:, None, None]
    x_t = (1.0 - s) * x0 + s * noise
    refs = batch.get("references")
    hidden = x_t if refs is None or refs.shape[1] == 0 else jnp.concatenate([x_t, refs.astype(F32)], axis=1)
    pred = model(
        hidden_states=hidden,
        encoder_hidden_states=batch["prompt_embeds"],
        encoder_hidden_states_mask=batch["prompt_mask"],
        timestep=sigma,
        img_shapes=img_shapes,
    )[:, :n_target]
    err = jnp.square(pred.astype(F32) - (noise - x0))
    if "loss_mask" in batch:
        w = jnp.maximum(batch["loss_mask"].astype(F32), mask_min_weight)
        w = jnp.tile(w, (1, 1, err.shape[-1] // w.shape[-1]))  # feature c·4 + k ← weight k (packing order)
        total = jnp.sum(w, axis=(1, 2))
        per_sample = jnp.sum(w * err, axis=(1, 2)) / jnp.where(total > 0, total, 1.0)
    else:
        per_sample = jnp.mean(err, axis=(1, 2))
    loss = jnp.mean(per_sample * weight)
    return loss, {"mse": jnp.mean(per_sample), "sigma": jnp.mean(sigma)}
