"""Prompt encoding as the Qwen-Image pipelines do it: templates + tokenizer + image processor → Qwen2.5-VL → embeds.

    enc = qwen_edit_jax.load_text_encoder("Qwen-Image-Edit")              # loading/text_encoder.py
    embeds, mask = enc.encode_prompt(prompts, images, variant="edit")     # [B, L, 3584], [B, L]

`QwenPromptEncoder.encode_prompt` equals diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`
/ `QwenImagePipeline.encode_prompt` with the text encoder called as it was trained (3D M-RoPE
positions for image tokens, i.e. `mm_token_type_ids` passed): the same template, resize, drop index,
right-padding and mask (always returned; diffusers gives None when it is all ones). Each prompt has
its own image(s); every row equals diffusers run on that prompt alone (diffusers' Edit-Plus refuses
batches).

Static shapes (one compiled program per bucket, never per sample). A batch is padded on the host to
a `BucketKey` before it reaches the device:
- rows to `bucket_length(B, 1)` (1, 2, 3, 4, 6, 8, 12, …), extra rows all padding;
- tokens to `bucket_length(L)` (64, 128, 192, 256, 384, 512, 768, 1024, 1536, …), right padding;
- the vision tower's sizes (`VisionShape`), each on its own ladder: patch rows `bucket_length(N)`
  (zero rows after the images' patches, in no attention group), window groups
  `bucket_length(windows, 8)` of the full window length (64 patches), full-attention groups
  `bucket_length(images, 1)` of `bucket_length(largest image's patches)`.
Images of any size therefore share a program with others of about the same total patch count, image
count and largest image; no grouping by size is needed. Padding never changes the valid tokens:
attention is causal with a key mask, positions count valid tokens only, and padded patches are
attended by nobody. Compiled programs are kept by key (`compiled_keys`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .models.text_encoder import (
    EncoderInputs, Qwen25VLConfig, Qwen25VLEncoder, VisionShape, prepare_inputs, vision_shape,
)
from .parallel import batch_axes_for, batch_sharding, replicated
from .preprocess import (
    QwenVLProcessor, TextEncoderInputs, bucket_length, build_inputs, extract_masked_hidden, pad_inputs,
)
from .preprocess.postprocess import check_max_sequence_length
from .preprocess.prompts import VARIANTS

WINDOW_BUCKET = 8  # window-group counts are padded to multiples of 8 (ladder): they shard over 8 chips


@dataclasses.dataclass(frozen=True)
class BucketKey:
    """The static shapes of one compiled encoding program."""

    batch: int
    length: int
    drop_idx: int
    vision: VisionShape | None


@dataclasses.dataclass(frozen=True)
class PaddedEmbeds:
    """Bucket-padded encoder output: embeds `[B', L', D]` and mask int32 `[B', L']` on device (valid tokens
    first, zeros after, rows ≥ `batch` all padding), `lengths` the valid tokens of the `batch` real rows."""

    embeds: jax.Array
    mask: jax.Array
    lengths: np.ndarray
    batch: int


def bucket_vision(shape: VisionShape, window_len: int) -> VisionShape:
    """The bucket covering `shape` (see the module docstring); `window_len` is the full window (patches)."""
    return VisionShape(num_patches=bucket_length(shape.num_patches), num_windows=bucket_length(shape.num_windows,
                       WINDOW_BUCKET), window_len=window_len, num_frames=bucket_length(shape.num_frames, 1),
                       frame_len=bucket_length(shape.frame_len))


def full_window_len(config: Qwen25VLConfig) -> int:
    """Patches in one whole attention window (64 for Qwen2.5-VL)."""
    v = config.vision_config
    return v.window_cells ** 2 * v.merge_unit


def bucket_key(config: Qwen25VLConfig, inputs: TextEncoderInputs) -> BucketKey:
    """The bucket of a processed batch (see the module docstring)."""
    b, n = inputs.input_ids.shape
    vision = None
    if inputs.image_grid_thw is not None and len(inputs.image_grid_thw):
        v = config.vision_config
        natural = vision_shape(inputs.image_grid_thw, spatial_merge_size=v.spatial_merge_size,
                               window_size=v.window_size, patch_size=v.patch_size)
        vision = bucket_vision(natural, full_window_len(config))
    return BucketKey(batch=bucket_length(b, 1), length=bucket_length(n), drop_idx=inputs.drop_idx, vision=vision)


def padded_arrays(config: Qwen25VLConfig, inputs: TextEncoderInputs, key: BucketKey,
                  pad_token_id: int) -> tuple[EncoderInputs, np.ndarray | None]:
    """Host arrays of one batch padded to `key`: (`EncoderInputs`, pixel_values `[num_patches, 1176]` | None)."""
    vision = key.vision
    padded = pad_inputs(inputs, pad_token_id, length=key.length, batch=key.batch,
                        num_patches=None if vision is None else vision.num_patches)
    grid = None if vision is None else padded.image_grid_thw
    enc = prepare_inputs(config, padded.input_ids, padded.attention_mask, grid, vision_shape=vision)
    return enc, None if vision is None else np.asarray(padded.pixel_values, np.float32)


def input_shardings(mesh: Mesh, inputs: EncoderInputs, pixel_values: Any) -> tuple[Any, Any]:
    """Shardings of (inputs, pixel_values) on `mesh`: token arrays and patch rows split over the batch axes
    (as far as they divide), the vision index arrays replicated."""
    rows = batch_sharding(mesh, inputs.input_ids.shape[0])
    positions = NamedSharding(mesh, P(None, batch_axes_for(mesh, inputs.input_ids.shape[0]) or None))
    vision = None if inputs.vision is None else jax.tree.map(lambda _: replicated(mesh), inputs.vision)
    shardings = EncoderInputs(input_ids=rows, attention_mask=rows, position_ids=positions, vision=vision)
    pixels = None if pixel_values is None else batch_sharding(mesh, pixel_values.shape[0])
    return shardings, pixels


def make_encode_fn(graphdef: Any, drop_idx: int):
    """`fn(state, inputs, pixel_values) -> (embeds [B, L - drop_idx, D], mask int32 [B, L - drop_idx])`: the
    forward pass and diffusers' masked extraction (valid tokens first, first `drop_idx` dropped), jit-able."""

    def fn(state: Any, inputs: EncoderInputs, pixel_values: jax.Array | None):
        model = nnx.merge(graphdef, state)
        hidden = model.forward(inputs, pixel_values)
        return extract_masked_hidden(hidden, inputs.attention_mask, drop_idx)

    return fn


class QwenPromptEncoder:
    """Qwen2.5-VL prompt encoder with the pipelines' preprocessing; see the module docstring.

    model: the loaded `Qwen25VLEncoder`. processor: `processor/` (edit variants); t2i_processor: the
    processor on `tokenizer/` (t2i, text only). Either may be None when the repo lacks the folder.
    """

    def __init__(self, model: Qwen25VLEncoder, *, processor: QwenVLProcessor | None = None,
                 t2i_processor: QwenVLProcessor | None = None, mesh: Mesh | None = None):
        if processor is None and t2i_processor is None:
            raise ValueError("QwenPromptEncoder needs a processor (edit variants) or a t2i_processor (t2i)")
        self.model, self.config, self.mesh = model, model.config, mesh
        self.processor, self.t2i_processor = processor, t2i_processor
        for name, proc in (("processor", processor), ("tokenizer", t2i_processor)):
            if proc is not None:
                check_tokenizer(proc, self.config, name)
        self._graphdef, self._state = nnx.split(model)
        self._compiled: dict[BucketKey, Any] = {}

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.model.options.dtype)

    @property
    def compiled_keys(self) -> list[BucketKey]:
        """The buckets compiled so far (one program each)."""
        return list(self._compiled)

    def processor_for(self, variant: str) -> QwenVLProcessor:
        """`processor/` for the edit variants, `tokenizer/` for t2i (as the diffusers pipelines read them)."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        proc = self.t2i_processor if variant == "t2i" else self.processor
        if proc is None:
            folder = "tokenizer/" if variant == "t2i" else "processor/"
            raise ValueError(f"variant {variant!r} needs the repo's {folder} folder, which was not loaded")
        return proc

    def prepare(self, prompts: str | Sequence[str], images=None, variant: str = "edit") -> TextEncoderInputs:
        """Templated, resized, processed and tokenized inputs (host numpy; `preprocess.build_inputs`)."""
        return build_inputs(self.processor_for(variant), prompts, images, variant)

    def encode_padded(self, prompts: str | Sequence[str], images=None, variant: str = "edit") -> PaddedEmbeds:
        """Encode into the bucket's static shapes (what a compiled consumer wants)."""
        inputs = self.prepare(prompts, images, variant)
        return self.encode_inputs(inputs, self.processor_for(variant).tokenizer.pad_token_id)

    def encode_inputs(self, inputs: TextEncoderInputs, pad_token_id: int) -> PaddedEmbeds:
        """Run prepared inputs through the bucket's compiled program."""
        key = bucket_key(self.config, inputs)
        enc, pixels = padded_arrays(self.config, inputs, key, pad_token_id)
        if self.mesh is not None:
            enc, pixels = jax.device_put((enc, pixels), input_shardings(self.mesh, enc, pixels))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._lower(key.drop_idx, enc, pixels).compile()
        if self.mesh is None:
            embeds, mask = compiled(self._state, enc, pixels)
        else:
            with jax.set_mesh(self.mesh):
                embeds, mask = compiled(self._state, enc, pixels)
        lengths = np.maximum(inputs.attention_mask.sum(axis=1) - inputs.drop_idx, 0)
        return PaddedEmbeds(embeds, mask, lengths, len(inputs.input_ids))

    def _lower(self, drop_idx: int, enc: EncoderInputs, pixels: Any):
        jitted = jax.jit(make_encode_fn(self._graphdef, drop_idx))
        if self.mesh is None:
            return jitted.lower(self._state, enc, pixels)
        with jax.set_mesh(self.mesh):
            return jitted.lower(self._state, enc, pixels)

    def encode_prompt(self, prompts: str | Sequence[str], images=None, variant: str = "edit",
                      max_sequence_length: int = 1024) -> tuple[jax.Array, jax.Array]:
        """diffusers' `encode_prompt`: (prompt_embeds `[B, L, D]` in the model dtype, mask int32 `[B, L]`).

        prompts: one string or a list. images: PIL images (or uint8 arrays) — "edit": one per prompt;
        "edit_plus": a list per prompt (a flat list for a single prompt); "t2i": None.
        L is the longest row's kept tokens (t2i: at most `max_sequence_length`; the edit pipelines only
        check max_sequence_length ≤ 1024).
        """
        check_max_sequence_length(max_sequence_length)
        out = self.encode_padded(prompts, images, variant)
        length = int(out.lengths.max(initial=0))
        if variant == "t2i" and max_sequence_length is not None:
            length = min(length, max_sequence_length)
        return out.embeds[:out.batch, :length], out.mask[:out.batch, :length]


def check_tokenizer(processor: QwenVLProcessor, config: Qwen25VLConfig, name: str) -> None:
    """The tokenizer must fit the model: its `<|image_pad|>` id is the config's, its ids fit the embedding."""
    tok = processor.tokenizer
    if tok.image_token_id != config.image_token_id:
        raise ValueError(f"{name}: <|image_pad|> has id {tok.image_token_id} but the text encoder's config says "
                         f"image_token_id {config.image_token_id}")
    if len(tok) > config.text_config.vocab_size:
        raise ValueError(f"{name}: {len(tok)} tokens do not fit the text encoder's vocab_size "
                         f"{config.text_config.vocab_size}")
    if tok.pad_token_id is None:
        raise ValueError(f"{name}: the tokenizer has no pad token (batches need one)")


__all__ = ["BucketKey", "PaddedEmbeds", "QwenPromptEncoder", "bucket_key", "bucket_vision", "input_shardings",
           "make_encode_fn", "padded_arrays"]
