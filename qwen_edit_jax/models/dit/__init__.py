"""The Qwen-Image double-stream MMDiT with merged QKV (diffusers `QwenImageTransformer2DModel`)."""

from .build import abstract_model, fresh_lora_state, init_transformer
from .transformer import BASE_PARAMS, QwenImageTransformer, count_params, normalize_img_shapes

__all__ = ["BASE_PARAMS", "QwenImageTransformer", "abstract_model", "count_params", "fresh_lora_state",
           "init_transformer", "normalize_img_shapes"]
