"""LoRA training for the merged-QKV Qwen-Image-Edit DiT: objective, cached data, jitted step, loop.

Modules: `config` (the YAML-backed `TrainConfig`), `objective` (flow matching, timestep
samplers), `data` (the bucketed loader over the cache of `qwen_edit_jax.cache_format`), `step` (`make_train_step`,
the optimisers, LoRA+), `ema` (the adapters' EMA in the optimiser state), `checkpoint` (Orbax, resume), `loop`
(`train`), `run_log` (metrics.jsonl, TensorBoard, wandb), `demo` (the latent demo's synthetic inputs, for tests
and fixtures; the trainer never makes its inputs).
"""

from ..cache_format import CachedDataset, CachedSample, DataError, write_cache
from .config import ConfigError, TrainConfig, load_config
from .data import BatchLoader
from .loop import TrainingPreempted, train
from .step import make_optimizer, make_train_step, split_lora

__all__ = ["BatchLoader", "CachedDataset", "CachedSample", "ConfigError", "DataError", "TrainConfig", "TrainingPreempted",
           "load_config", "make_optimizer", "make_train_step", "split_lora", "train", "write_cache"]
