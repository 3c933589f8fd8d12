"""Random weights drawn with numpy: one tensor by its name, or a whole DiT as a diffusers folder.

numpy rather than JAX: JAX compiles its random-number program once per tensor shape, seconds on a CPU
for a model, while these fixtures are written in a fraction of that.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import DiTConfig
from ..utils.files import atomic_path
from ..weights.keymap import torch_shapes
from ..weights.safetensors_io import SINGLE_NAME
from ..weights.writer import write_safetensors_file


def random_tensor(shape: tuple[int, ...], name: str, rng: np.random.Generator) -> np.ndarray:
    """float32 weights of checkpoint tensor `name`: norm scales ≈ 1, biases small, the rest N(0, 1/fan_in)."""
    if len(shape) == 1 and ("norm" in name or "ln_q" in name or name.endswith("gamma")):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) == 1 or name.endswith(".bias"):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def write_random_transformer(folder: str | os.PathLike, config: DiTConfig, seed: int = 0) -> Path:
    """A random DiT as a diffusers `transformer/` folder (config.json + one safetensors file), atomically.

    Drawn as `init_transformer` draws (kernels N(0, 1/fan_in), biases 0, norm scales 1), straight in
    torch layout.
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in torch_shapes(config).items():
        if name.endswith(".bias"):
            tensors[name] = np.zeros(shape, np.float32)
        elif len(shape) == 1:  # RMSNorm scale
            tensors[name] = np.ones(shape, np.float32)
        else:  # Linear weight [out, in]
            tensors[name] = (rng.standard_normal(shape, np.float32) / np.sqrt(shape[1])).astype(np.float32)
    folder = Path(folder)
    with atomic_path(folder, is_dir=True) as tmp:
        config.to_json(os.path.join(tmp, "config.json"))
        write_safetensors_file(os.path.join(tmp, SINGLE_NAME), tensors, metadata={"format": "pt"})
    return folder


__all__ = ["random_tensor", "write_random_transformer"]
