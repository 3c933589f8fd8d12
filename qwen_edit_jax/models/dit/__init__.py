"""The Qwen-Image double-stream MMDiT with merged QKV (diffusers `QwenImageTransformer2DModel`)."""

from .build import abstract_model, fresh_lora_state, init_dora_magnitudes, init_transformer
from .layers import ADAPTER_STATE, LoraTable, lokr_factorization
from .transformer import BASE_PARAMS, QwenImageTransformer, count_params, normalize_img_shapes

__all__ = [
           "ADAPTER_STATE",
           "BASE_PARAMS",
           "LoraTable",
           "QwenImageTransformer",
           "abstract_model",
           "count_params",
           "fresh_lora_state",
           "init_dora_magnitudes",
           "init_transformer",
           "lokr_factorization",
           "normalize_img_shapes",
]
