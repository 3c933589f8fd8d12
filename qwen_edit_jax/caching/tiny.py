"""A tiny random Qwen-Image-Edit repo folder (what caching reads) for tests and demos, without torch.

`write_tiny_edit_repo(path, variant)` writes the diffusers layout with random weights:
`model_index.json`, `vae/` (AutoencoderKLQwenImage, 4 levels so the spatial factor is 8 as released),
`text_encoder/` (Qwen2.5-VL, transformers-5 layout: 2 text layers of width 64, a 2-block vision tower),
`tokenizer/` (the tiny Qwen2 BPE of `preprocess.tiny`) and `processor/` (that tokenizer plus a
`preprocessor_config.json` whose small `max_pixels` keeps images to a few windows). No transformer:
caching never reads one. The parts have their own writers (`write_tiny_text_parts`, `write_tiny_vae`,
`write_model_index`) so that `demo/` builds its complete repo from the same pieces.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..loading.vae import expected_tensors
from ..models.text_encoder import Qwen25VLConfig
from ..models.vae import VAEConfig
from ..preprocess import QwenTokenizer
from ..preprocess.tiny import write_tiny_tokenizer
from ..weights import text_encoder_keys

PIPELINE_CLASS = {"edit": "QwenImageEditPipeline", "edit_plus": "QwenImageEditPlusPipeline"}
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True])
TINY_IMAGE_PROCESSOR = {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": 14, "temporal_patch_size": 2,
                        "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}


def _random(shape: tuple[int, ...], name: str, rng: np.random.Generator) -> np.ndarray:
    """Norm weights ≈ 1, biases small, everything else N(0, 1/fan_in)."""
    if len(shape) == 1 and ("norm" in name or "ln_q" in name or name.endswith("gamma")):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) == 1 or name.endswith(".bias"):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def write_tiny_vae(folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    config = VAEConfig(**TINY_VAE, latents_mean=tuple(rng.normal(0, 0.5, 16).round(3)),
                       latents_std=tuple(rng.uniform(0.5, 2.0, 16).round(3)))
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    tensors = {name: _random(tuple(shape), name, rng) for name, shape in sorted(expected_tensors(config).items())}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def tiny_text_encoder_config(token_ids: dict[str, int], vocab_size: int) -> dict:
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


def write_tiny_text_encoder(folder: str | Path, token_ids: dict[str, int], vocab_size: int, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = tiny_text_encoder_config(token_ids, vocab_size)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    config = Qwen25VLConfig.from_dict(raw, source=str(folder / "config.json"))
    rng = np.random.default_rng(seed)
    shapes = text_encoder_keys.checkpoint_shapes(config, "transformers5")
    save_file({n: _random(s, n, rng) for n, s in sorted(shapes.items())}, str(folder / "model.safetensors"))
    return folder


def write_tiny_text_parts(root: str | os.PathLike, seed: int = 0) -> Path:
    """`tokenizer/`, `processor/` and `text_encoder/` of the tiny repo into `root`; returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(root / "tokenizer")
    if (root / "processor").exists():
        shutil.rmtree(root / "processor")
    shutil.copytree(root / "tokenizer", root / "processor")
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(TINY_IMAGE_PROCESSOR, indent=2))
    tok = QwenTokenizer.from_folder(root / "tokenizer")
    ids = {k: tok.token_to_id(t) for k, t in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                               ("vision_start_token_id", "<|vision_start|>"),
                                               ("vision_end_token_id", "<|vision_end|>"))}
    write_tiny_text_encoder(root / "text_encoder", ids, -(-len(tok) // 64) * 64, seed)
    return root


def write_model_index(root: str | os.PathLike, variant: str, *, transformer: bool = False,
                      scheduler: bool = False) -> Path:
    """`model_index.json` of an edit repo (`variant` "edit" / "edit_plus"); `transformer` / `scheduler`
    say whether those folders exist (else they are listed as [null, null], as diffusers writes a
    missing component)."""
    if variant not in PIPELINE_CLASS:
        raise ValueError(f"variant must be one of {sorted(PIPELINE_CLASS)}, got {variant!r}")
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
    """Write the tiny repo (see the module docstring); returns its folder."""
    if variant not in PIPELINE_CLASS:
        raise ValueError(f"variant must be one of {sorted(PIPELINE_CLASS)}, got {variant!r}")
    root = write_tiny_text_parts(path, seed)
    write_tiny_vae(root / "vae", seed)
    write_model_index(root, variant)
    return root


__all__ = ["PIPELINE_CLASS", "TINY_IMAGE_PROCESSOR", "TINY_VAE", "tiny_text_encoder_config", "write_model_index",
           "write_tiny_edit_repo", "write_tiny_text_encoder", "write_tiny_text_parts", "write_tiny_vae"]
