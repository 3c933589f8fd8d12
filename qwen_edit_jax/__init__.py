"""qwen_edit_jax: the Qwen-Image(-Edit) MMDiT with merged QKV in JAX/Flax NNX, for LoRA training.

Layers, bottom up (a module imports only from lower layers): `config`, `errors`, `packing`, `utils`
→ `parallel` → `models`, `weights`, `imaging`, `cache_format` → `lora` → `loading`, `convert`, `preprocess`, `encoding` → `sampling`,
`pipeline` → `training`, `caching`.
"""

from flax import nnx as _nnx

# Shardings are applied explicitly (see `parallel/`), never at variable creation.
_nnx.use_eager_sharding(False)

from .config import PRESETS, DiTConfig, LoraConfig, ModelOptions, preset  # noqa: E402
from .encoding import QwenPromptEncoder  # noqa: E402
from .loading import (  # noqa: E402
    QwenImageVAE,
    init_vae,
    iter_torch_params,
    load_text_encoder,
    load_transformer,
    load_vae,
    model_from_params,
    save_transformer,
)
from .models.dit import QwenImageTransformer, abstract_model, count_params, init_transformer  # noqa: E402
from .models.vae import VAEConfig  # noqa: E402
from .packing import pack_latents, unpack_latents  # noqa: E402
from .pipeline import QwenImageEditPipeline  # noqa: E402

__all__ = [
    "DiTConfig", "LoraConfig", "ModelOptions", "PRESETS", "QwenImageEditPipeline", "QwenImageTransformer",
    "QwenImageVAE", "QwenPromptEncoder",
    "VAEConfig", "abstract_model", "count_params", "init_transformer", "init_vae", "iter_torch_params",
    "load_text_encoder", "load_transformer", "load_vae", "model_from_params", "pack_latents", "preset",
    "save_transformer", "unpack_latents",
]
__version__ = "0.1.0"
