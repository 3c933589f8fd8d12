"""Qwen2.5-VL prompt encoder (vision tower + language model with M-RoPE), inference only, Flax NNX."""

from .config import ENCODER_QUANT_MODES, EncoderOptions, Qwen25VLConfig, TextConfig, VisionConfig
from .model import EncoderInputs, Qwen25VLEncoder, prepare_inputs
from .positions import VisionLayout, VisionShape, get_rope_index, vision_layout, vision_shape

__all__ = ["ENCODER_QUANT_MODES", "EncoderInputs", "EncoderOptions", "Qwen25VLConfig", "Qwen25VLEncoder", "TextConfig",
           "VisionConfig", "VisionLayout", "VisionShape", "get_rope_index", "prepare_inputs", "vision_layout",
           "vision_shape"]
