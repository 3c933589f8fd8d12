"""The end-to-end demo's assets (layer 6, beside `training` and `caching`): a complete tiny random
Qwen-Image-Edit repo with a *readable* VAE (`vae.py`: encode → decode exact on flat 8×8 blocks, so
decoded samples are pictures) and a synthetic dataset of square-scene edit pairs (`assets.py`).

`python -m qwen_edit_jax.demo --out demo_data` writes both once.
"""

from .assets import (
    DEMO_EDITS,
    SCHEDULER_CONFIG,
    Scene,
    demo_vae_config,
    demo_validation_prompts,
    edit_scenes,
    write_demo_pairs,
    write_demo_repo,
)
from .vae import block_means, latent_matrix, readable_vae_config, readable_vae_params

__all__ = ["DEMO_EDITS", "SCHEDULER_CONFIG", "Scene", "block_means", "demo_validation_prompts", "demo_vae_config",
           "edit_scenes", "latent_matrix", "readable_vae_config", "readable_vae_params", "write_demo_pairs",
           "write_demo_repo"]
