"""`Qwen25VLEncoder`: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration` without lm_head) in Flax NNX.

Returns the final normed hidden states `[B, L, D]` (transformers' `hidden_states[-1]`), with image
features scattered into the `<|image_pad|>` positions and 3D M-RoPE positions for image tokens —
the behaviour the model was trained with (transformers 4.x; ≥ 5.15 only with `mm_token_type_ids`).

Two steps, so the compiled part has only array inputs:
1. `prepare_inputs` (host, numpy): M-RoPE positions and the vision tower's index arrays from
   `input_ids`, `attention_mask` and `image_grid_thw` (data-dependent, see `positions.py`);
2. `forward(inputs, pixel_values)` (traceable; jit it): vision tower, scatter, language model.
`__call__` does both, running step 2 under `nnx.jit`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import EncoderOptions, Qwen25VLConfig
from .language import TextModel
from .positions import VisionLayout, VisionShape, get_rope_index, vision_layout
from .vision import VisionTransformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EncoderInputs:
    """The host-prepared inputs of one batch (all arrays; `vision` is None without images).

    input_ids `[B, L]` int32; attention_mask `[B, L]` bool; position_ids `[3, B, L]` int32.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    vision: VisionLayout | None


def prepare_inputs(config: Qwen25VLConfig, input_ids, attention_mask=None, image_grid_thw=None, *,
                   vision_shape: VisionShape | None = None) -> EncoderInputs:
    """Host-side preparation: positions (`get_rope_index`) and the vision layout (numpy).

    `vision_shape` pads the vision layout to a bucket (`pixel_values` must then have
    `vision_shape.num_patches` rows, the images' patches first).
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grid = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    v = config.vision_config
    position_ids, _ = get_rope_index(ids, grid, mask, image_token_id=config.image_token_id,
                                     spatial_merge_size=v.spatial_merge_size, video_token_id=config.video_token_id)
    layout = None
    if grid is not None and len(grid):
        layout = vision_layout(grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                               patch_size=v.patch_size, shape=vision_shape)
    return EncoderInputs(ids.astype(np.int32), mask, position_ids.astype(np.int32), layout)


def scatter_image_features(embeds: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
    """transformers' `masked_scatter`: the i-th `True` of `is_image` (row-major) gets `features[i]`."""
    flat = is_image.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    out = jnp.where(flat[:, None], features[idx].astype(embeds.dtype), embeds.reshape(flat.shape[0], -1))
    return out.reshape(embeds.shape)


class Qwen25VLEncoder(nnx.Module):
    """The Qwen2.5-VL prompt encoder: `model.visual` + `model.language_model` (names as transformers)."""

    def __init__(self, config: Qwen25VLConfig, options: EncoderOptions | None = None, *, rngs: nnx.Rngs | None = None):
        options = options or EncoderOptions()
        rngs = rngs or nnx.Rngs(0)
        self.config, self.options = config, options
        self.visual = VisionTransformer(config.vision_config, options, rngs=rngs)
        self.language_model = TextModel(config.text_config, options, rngs=rngs)

    def forward(self, inputs: EncoderInputs, pixel_values: jax.Array | None = None) -> jax.Array:
        """Traceable forward pass on prepared inputs → last hidden state `[B, L, D]`."""
        embeds = self.language_model.embed_tokens(inputs.input_ids)
        if inputs.vision is not None:
            if pixel_values is None:
                raise ValueError("image_grid_thw was given but pixel_values is None")
            feats = self.visual(pixel_values.astype(self.options.dtype), inputs.vision)
            # prepare_inputs checked that the image-token runs match image_grid_thw one to one
            embeds = scatter_image_features(embeds, inputs.input_ids == self.config.image_token_id, feats)
        return self.language_model(embeds, inputs.position_ids, inputs.attention_mask)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """`input_ids [B, L]`, `attention_mask [B, L]` (1 = token), `pixel_values [N, 1176]` (all
        images' patches, in order), `image_grid_thw [n_images, 3]` → last hidden state `[B, L, D]`."""
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("pixel_values was given without image_grid_thw")
        inputs = prepare_inputs(self.config, input_ids, attention_mask, image_grid_thw)
        pv = None if pixel_values is None else jnp.asarray(pixel_values)
        return _jit_forward(self, inputs, pv)


@nnx.jit
def _jit_forward(model: Qwen25VLEncoder, inputs: EncoderInputs, pixel_values: jax.Array | None) -> jax.Array:
    return model.forward(inputs, pixel_values)
