"""Flow-match Euler schedule of the Qwen-Image pipelines (`FlowMatchEulerDiscreteScheduler`), bit-exact.

Shared by sampling (the sigmas of the denoising loop) and training (the σ distribution of the
objective uses the same shift and terminal stretch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import CheckpointError

F32 = jnp.float32


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
    """`FlowMatchEulerDiscreteScheduler` settings, one field per `__init__` argument of diffusers' class.

    The defaults are Qwen-Image's `scheduler/scheduler_config.json` (dynamic shift, terminal 0.02); a
    `scheduler_config.json` read by `scheduler_config_from_dict` takes the *class's* defaults for the
    keys it leaves out, as diffusers does. `stochastic_sampling` (fresh noise from torch's global
    generator at every step) is refused: the compiled loop is deterministic.
    """

    num_train_timesteps: int = 1000
    base_shift: float | None = 0.5
    max_shift: float | None = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"  # or "linear"
    shift: float = 1.0  # the fixed shift, used when use_dynamic_shifting is False
    use_dynamic_shifting: bool = True  # μ from the target's token count (calculate_shift)
    invert_sigmas: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        for key in _BOOL_KEYS:
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("num_train_timesteps", "base_image_seq_len", "max_image_seq_len"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int):
                raise TypeError(f"{key} must be an integer, got {getattr(self, key)!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if not _is_number(self.shift) or self.shift <= 0:
            raise ValueError(f"shift must be a number > 0, got {self.shift!r}")
        if self.use_dynamic_shifting:
            for key in ("base_shift", "max_shift"):
                if not _is_number(getattr(self, key)):
                    raise ValueError(f"{key} must be a number with use_dynamic_shifting, got {getattr(self, key)!r}")
            if self.max_image_seq_len <= self.base_image_seq_len:
                raise ValueError(f"max_image_seq_len {self.max_image_seq_len} must exceed "
                                 f"base_image_seq_len {self.base_image_seq_len}")
        if self.shift_terminal is not None and not (_is_number(self.shift_terminal)
                                                    and 0.0 <= self.shift_terminal < 1.0):
            raise ValueError(f"shift_terminal must be in [0, 1), got {self.shift_terminal}")
        if self.use_karras_sigmas + self.use_exponential_sigmas + self.use_beta_sigmas > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be true")
        if self.stochastic_sampling:
            raise ValueError("stochastic_sampling=true is not supported (diffusers draws its per-step noise from "
                             "torch's global generator; this sampler is deterministic): set it to false")


_BOOL_KEYS = ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
              "use_beta_sigmas", "stochastic_sampling")
# FlowMatchEulerDiscreteScheduler.__init__'s defaults (diffusers 0.42): what a config file's missing keys mean
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False, "shift_terminal": None,
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "time_shift_type": "exponential", "stochastic_sampling": False,
}
QWEN_IMAGE_SCHEDULER = FlowMatchConfig()


def scheduler_config_from_dict(d: Any, where: str = "scheduler_config") -> FlowMatchConfig:
    """A `FlowMatchConfig` from a diffusers scheduler config dict (`scheduler_config.json`'s content).

    Missing keys take the scheduler class's defaults (as `FlowMatchEulerDiscreteScheduler.from_config`);
    keys starting with "_" (`_class_name`, `_diffusers_version`) are ignored; any other unknown key is
    an error, as is a `_class_name` other than FlowMatchEulerDiscreteScheduler. `where` names the source
    in the one-line `ValueError`.
    """
    if not isinstance(d, dict):  # a config file's content: a ValueError like every other bad value in it
        raise ValueError(f"{where}: expected a JSON object of FlowMatchEulerDiscreteScheduler settings, "  # noqa: TRY004
                         f"got {type(d).__name__}")
    cls = d.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if cls != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{where}: _class_name {cls!r} is not supported (only FlowMatchEulerDiscreteScheduler)")
    unknown = sorted(k for k in d if not str(k).startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (FlowMatchEulerDiscreteScheduler takes "
                         f"{', '.join(DIFFUSERS_DEFAULTS)})")
    try:
        return FlowMatchConfig(**{k: d.get(k, v) for k, v in DIFFUSERS_DEFAULTS.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def read_scheduler_config(path: str | os.PathLike) -> FlowMatchConfig:
    """`scheduler_config_from_dict` of a JSON file (e.g. a repo's `scheduler/scheduler_config.json`)."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: scheduler config not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON scheduler config ({e})") from None
    return scheduler_config_from_dict(d, path)


def as_scheduler_config(source: Any) -> FlowMatchConfig:
    """A `FlowMatchConfig` from a `FlowMatchConfig`, a config dict or the path of a JSON file."""
    if isinstance(source, FlowMatchConfig):
        return source
    if isinstance(source, dict):
        return scheduler_config_from_dict(source)
    if isinstance(source, (str, os.PathLike)):
        return read_scheduler_config(source)
    raise TypeError(f"scheduler_config must be a FlowMatchConfig, a dict or a JSON file path, "
                    f"got {type(source).__name__}")


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


def _convert_sigmas(sigmas: np.ndarray, n: int, config: FlowMatchConfig) -> np.ndarray:
    """The Karras / exponential / beta respacing between the shifted schedule's ends, in float64 as diffusers
    computes it (`_convert_to_karras` / `_convert_to_exponential` / `_convert_to_beta`, rho 7, alpha = beta = 0.6)."""
    sigma_min, sigma_max = sigmas[-1].item(), sigmas[0].item()
    if config.use_karras_sigmas:
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        min_inv_rho = sigma_min ** (1 / rho)
        max_inv_rho = sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    if config.use_exponential_sigmas:
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
    import scipy.stats  # a dependency of jax; only the beta spacing needs it

    return np.array([sigma_min + (ppf * (sigma_max - sigma_min))
                     for ppf in [scipy.stats.beta.ppf(t, 0.6, 0.6) for t in 1 - np.linspace(0, 1, n)]])


def flow_match_sigmas(
    num_inference_steps: int,
    image_seq_len: int | None = None,
    *,
    mu: float | None = None,
    config: FlowMatchConfig = QWEN_IMAGE_SCHEDULER,
) -> np.ndarray:
    """The n+1 float32 sigmas that diffusers' scheduler produces for the Qwen-Image pipelines' call.

    The pipelines pass `sigmas = linspace(1, 1/n, n)` and μ = `calculate_shift(target tokens)`; the
    scheduler then shifts them (dynamic: exponential or linear in μ; else the fixed `shift`), stretches
    them to `shift_terminal`, respaces them (Karras / exponential / beta) and appends 0 — or, with
    `invert_sigmas`, takes 1 − σ and appends 1. Give `image_seq_len` (target tokens, (H/16)·(W/16)) or
    `mu` directly (only the dynamic shift reads either). The arithmetic is the same float32 (float64 for
    the respacing) numpy as `FlowMatchEulerDiscreteScheduler.set_timesteps`, so the result is
    bit-identical, not merely close. One exception: for a single step diffusers' terminal stretch divides
    0 by 0 (NaN sigmas); here the stretch is skipped then.
    """
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    sigmas = np.linspace(1.0, 1 / n, n).astype(np.float32)
    if config.use_dynamic_shifting:
        if mu is None:
            if image_seq_len is None or image_seq_len < 1:
                raise ValueError(f"flow_match_sigmas needs image_seq_len (target tokens) >= 1 or mu; "
                                 f"got {image_seq_len}")
            mu = calculate_shift(int(image_seq_len), config)
        if config.time_shift_type == "exponential":
            sigmas = exponential_shift(sigmas, mu)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1))
    else:
        shift = config.shift
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if config.shift_terminal and n > 1:
        sigmas = stretch_to_terminal(sigmas, config.shift_terminal)
    if config.use_karras_sigmas or config.use_exponential_sigmas or config.use_beta_sigmas:
        sigmas = _convert_sigmas(sigmas, n, config)
    sigmas = sigmas.astype(np.float32)
    if config.invert_sigmas:
        return np.concatenate([1.0 - sigmas, np.ones(1, np.float32)])
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


def model_timesteps(sigmas: np.ndarray, dtype: Any = np.float32, num_train_timesteps: int = 1000) -> np.ndarray:
    """The timestep the model sees at each step: the pipelines pass `t.to(latents.dtype) / 1000` with
    t = σ·num_train_timesteps (the scheduler's timesteps; the pipelines divide by a literal 1000).

    In fp32 that is σ up to one rounding; in bf16 it rounds σ (0.98696 → 0.98828), which is what the
    reference pipeline feeds the model, so we replicate it. Returned as float32 values (exact in `dtype`).
    """
    dtype = np.dtype(dtype)
    t = np.asarray(sigmas[:-1], np.float32) * np.float32(num_train_timesteps)
    return (t.astype(dtype) / np.asarray(1000, dtype)).astype(np.float32)


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
