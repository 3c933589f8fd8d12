"""Tiny diffusers reference models for parity tests (every parameter randomised)."""

from __future__ import annotations

import copy
import os

import numpy as np

from qwen_edit_jax.config import DiTConfig


def make_torch_model(cfg: DiTConfig, seed: int = 0):
    """A diffusers `QwenImageTransformer2DModel` with every parameter random (none left at init zeros)."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    d = cfg.to_dict()
    d.pop("_class_name")
    model = QwenImageTransformer2DModel(**d).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    return model


def save_torch_model(model, path: str, *, sharded: bool = False, dtype=None) -> str:
    """`save_pretrained` (optionally cast to `dtype`); `model` itself is left untouched (a cast copy is
    saved: casting in place and back would leave its fp32 weights rounded to `dtype`)."""
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    kw = {"max_shard_size": "300KB"} if sharded else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return os.fspath(path)


def torch_forward(model, hidden, enc, mask, sigma, img_shapes) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(np.array(hidden)),
            encoder_hidden_states=torch.from_numpy(np.array(enc)),
            encoder_hidden_states_mask=None if mask is None else torch.from_numpy(np.array(mask)),
            timestep=torch.from_numpy(np.array(sigma)),
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
    return out.float().numpy()
