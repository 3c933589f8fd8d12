"""The loading layer: checkpoint files (`weights/`) → models (`models/`) → devices (`parallel/`)."""

from .dit import (
    array_from_lazy,
    init_lora,
    iter_torch_params,
    load_transformer,
    model_from_params,
    model_params,
    place_params,
    save_transformer,
)
from .text_encoder import load_text_encoder, load_text_encoder_model
from .vae import QwenImageVAE, init_vae, load_vae, vae_from_tensors

__all__ = ["QwenImageVAE", "array_from_lazy", "init_lora", "init_vae", "iter_torch_params", "load_text_encoder",
           "load_text_encoder_model", "load_transformer", "load_vae", "model_from_params", "model_params",
           "place_params", "save_transformer", "vae_from_tensors"]
