"""qwen_edit_jax: the Qwen-Image(-Edit) MMDiT with merged QKV in JAX/Flax NNX, for LoRA training."""

from flax import nnx as _nnx

# Shardings are applied explicitly (see `sharding.py`), never at variable creation.
_nnx.use_eager_sharding(False)

from .api import abstract_model, init_transformer, iter_torch_params, load_transformer, model_from_params  # noqa: E402
from .config import PRESETS, DiTConfig, LoraConfig, ModelOptions, preset  # noqa: E402
from .packing import pack_latents, unpack_latents  # noqa: E402
from .transformer import QwenImageTransformer, count_params  # noqa: E402

__all__ = [
    "DiTConfig", "LoraConfig", "ModelOptions", "PRESETS", "QwenImageTransformer", "abstract_model",
    "count_params", "init_transformer", "iter_torch_params", "load_transformer", "model_from_params",
    "pack_latents", "preset", "unpack_latents",
]
__version__ = "0.1.0"
