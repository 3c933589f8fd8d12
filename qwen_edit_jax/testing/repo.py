"""Tiny random Qwen-Image-Edit repo folders in the diffusers layout, without torch.

`write_tiny_edit_repo(path, variant)` writes what caching reads: `model_index.json`, `vae/` (random
`TINY_VAE`), `text_encoder/` (Qwen2.5-VL, transformers-5 layout: 2 text layers of width 64, a 2-block
vision tower), `tokenizer/` and `processor/` (the tiny BPE of `testing.tokenizer`). No transformer:
caching never reads one.

`write_demo_repo(path)` writes the complete repo the end-to-end demo runs, which
`QwenImageEditPipeline.from_pretrained` loads: the same text parts, the readable VAE (encode →
decode exact on flat 8×8 blocks, so decoded samples are pictures, not noise), a random DiT of the
`tiny` preset (its text width 64 is the tiny encoder's) and the released scheduler config. It is
built under a temporary name and renamed when complete; an existing one with the same settings is
reused (`testing.manifest`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from ..config import preset
from ..loading.vae import save_vae
from ..models.text_encoder import Qwen25VLConfig
from ..utils.files import atomic_path
from ..weights import text_encoder_keys
from .manifest import mark_finished, reuse
from .tokenizer import write_tiny_processor
from .vae import demo_vae_config, readable_vae_params, write_tiny_vae
from .random_weights import random_tensor, write_random_transformer

PIPELINE_CLASS = {"edit": "QwenImageEditPipeline", "edit_plus": "QwenImageEditPlusPipeline"}
DIT_PRESET = "tiny"
# the released Qwen-Image(-Edit) scheduler/scheduler_config.json (see shared/reference/qwen_image_dit.md §6)
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.34.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def _check_variant(variant: str) -> None:
    if variant not in PIPELINE_CLASS:
        raise ValueError(f"variant must be one of {sorted(PIPELINE_CLASS)}, got {variant!r}")


def tiny_text_encoder_config(token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """A transformers-5 `config.json` for the tiny Qwen2.5-VL."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "text_config": {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                        "hidden_act": "silu",
                        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}},
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4,
                          "out_hidden_size": 64, "fullatt_block_indexes": [1], "window_size": 112, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "silu"},
        **token_ids,
    }


def write_tiny_text_encoder(folder: str | os.PathLike, token_ids: dict[str, int], vocab_size: int,
                            seed: int = 0) -> Path:
    """The random tiny Qwen2.5-VL (`tiny_text_encoder_config`) as a `text_encoder/` folder; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = tiny_text_encoder_config(token_ids, vocab_size)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    config = Qwen25VLConfig.from_dict(raw, source=str(folder / "config.json"))
    rng = np.random.default_rng(seed)
    shapes = text_encoder_keys.checkpoint_shapes(config, "transformers5")
    save_file({n: random_tensor(s, n, rng) for n, s in sorted(shapes.items())}, str(folder / "model.safetensors"))
    return folder


def write_tiny_text_parts(root: str | os.PathLike, seed: int = 0) -> Path:
    """`tokenizer/`, `processor/` and `text_encoder/` of the tiny repo into `root`; returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_processor(root)
    write_tiny_text_encoder(root / "text_encoder", vocab.token_ids, vocab.vocab_size, seed)
    return root


def write_model_index(root: str | os.PathLike, variant: str, *, transformer: bool = False,
                      scheduler: bool = False) -> Path:
    """`model_index.json` of an edit repo (`variant` "edit" / "edit_plus"); `transformer` / `scheduler`
    say whether those folders exist (else they are listed as [null, null], as diffusers writes a
    missing component)."""
    _check_variant(variant)
    index = {"_class_name": PIPELINE_CLASS[variant], "_diffusers_version": "0.42.1",
             "processor": ["transformers", "Qwen2VLProcessor"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"] if scheduler else [None, None],
             "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
             "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "QwenImageTransformer2DModel"] if transformer else [None, None],
             "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    path = Path(root) / "model_index.json"
    path.write_text(json.dumps(index, indent=2))
    return path


def write_tiny_edit_repo(path: str | os.PathLike, variant: str = "edit_plus", seed: int = 0) -> Path:
    """The tiny repo caching reads (see the module docstring); returns its folder."""
    _check_variant(variant)
    root = write_tiny_text_parts(path, seed)
    write_tiny_vae(root / "vae", seed)
    write_model_index(root, variant)
    return root


def write_demo_repo(path: str | os.PathLike, *, variant: str = "edit_plus", seed: int = 0) -> Path:
    """The complete tiny repo the demo runs (see the module docstring) at `path`; an existing one is reused."""
    _check_variant(variant)
    dest = Path(path).absolute()
    manifest = {"kind": "repo", "variant": variant, "seed": seed, "dit_preset": DIT_PRESET}
    if reuse(dest, manifest):
        return dest
    with atomic_path(dest, is_dir=True) as tmp:
        root = Path(tmp)
        write_tiny_text_parts(root, seed)
        config = demo_vae_config()
        save_vae(readable_vae_params(config), root / "vae", config=config)
        write_random_transformer(root / "transformer", preset(DIT_PRESET), seed)
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
        write_model_index(root, variant, transformer=True, scheduler=True)
        mark_finished(root, manifest)
    return dest


__all__ = ["DIT_PRESET", "PIPELINE_CLASS", "SCHEDULER_CONFIG", "tiny_text_encoder_config", "write_demo_repo",
           "write_model_index", "write_tiny_edit_repo", "write_tiny_text_encoder", "write_tiny_text_parts"]
