"""From the encoder's last hidden state to `prompt_embeds` / mask, and shape buckets for batching.

diffusers (`_get_qwen_prompt_embeds` + `encode_prompt`): keep each row's valid tokens (attention mask,
`_extract_masked_hidden`), drop the first `drop_idx` of them, right-pad with zeros to the longest
row, mask 1 on kept tokens; t2i then cuts to `max_sequence_length` (the edit pipelines only check it
is ≤ 1024); `encode_prompt` returns mask None when it is all ones.

`extract_masked_hidden` does the first three steps with static shapes (jit-able: output length
L - drop_idx, padded); `trim_to_longest` then cuts on the host to diffusers' exact length.

Buckets: a compiled program per (batch, sequence length, patch count) would recompile for nearly every
batch, since prompt lengths and image token counts vary. Lengths are padded up to a ladder of sizes
{2^k, 3 * 2^(k-1)} * 64, i.e. 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, …: every bucket
is a multiple of 64 (the vision window is 64 patches; 64 suits TPU/GPU tiles), padding is at most a
third of a bucket from 128 on, and there are two programs per doubling. Typical rows: Edit ≈ 1.45 k
tokens → 1536; Edit-Plus with one image ≈ 300 → 384; t2i prompts → 64–192. Padding tokens get the pad
id and attention mask 0, so valid tokens' hidden states are unchanged; padded patch rows are zeros
after the images' `sum(t*h*w)` rows, for the vision tower to ignore.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from .prompts import TOKENIZER_MAX_LENGTH, TextEncoderInputs

BUCKET_MULTIPLE = 64


def extract_masked_hidden(hidden_states, attention_mask, drop_idx: int):
    """Valid tokens of each row moved to the front, the first `drop_idx` dropped, zero-padded on the right.

    hidden_states `[B, L, D]`, attention_mask `[B, L]` (any padding side) → (embeds `[B, L - drop_idx, D]`,
    mask int32 `[B, L - drop_idx]`). Pure jnp, static shapes: `drop_idx` must be a Python int.
    """
    valid = jnp.asarray(attention_mask).astype(bool)
    order = jnp.argsort(~valid, axis=1, stable=True)  # valid positions first, in order
    kept = jnp.take_along_axis(jnp.asarray(hidden_states), order[:, :, None], axis=1)[:, drop_idx:]
    lengths = jnp.maximum(valid.sum(axis=1) - drop_idx, 0)
    mask = jnp.arange(kept.shape[1])[None, :] < lengths[:, None]
    return jnp.where(mask[:, :, None], kept, jnp.zeros((), kept.dtype)), mask.astype(jnp.int32)


def trim_to_longest(embeds, mask) -> tuple[np.ndarray, np.ndarray]:
    """Cut padded `[B, L', D]` / `[B, L']` to the longest row's length (diffusers' `max_seq_len`), numpy."""
    mask = np.asarray(mask)
    length = int(mask.sum(axis=1).max(initial=0))
    return np.asarray(embeds)[:, :length], mask[:, :length]


def check_max_sequence_length(max_sequence_length: int | None) -> None:
    """The pipelines' `check_inputs`: max_sequence_length may not exceed 1024."""
    if max_sequence_length is not None and max_sequence_length > TOKENIZER_MAX_LENGTH:
        raise ValueError(f"`max_sequence_length` cannot be greater than {TOKENIZER_MAX_LENGTH} but is "
                         f"{max_sequence_length}")


def prompt_embeds_from_hidden(hidden_states, attention_mask, drop_idx: int, variant: str,
                              max_sequence_length: int | None = TOKENIZER_MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' `encode_prompt` output from the last hidden state: (prompt_embeds `[B, L', D]`, mask `[B, L']`).

    The mask is always returned (diffusers returns None when it is all ones; see `mask_or_none`).
    """
    check_max_sequence_length(max_sequence_length)
    embeds, mask = trim_to_longest(*extract_masked_hidden(hidden_states, attention_mask, drop_idx))
    if variant == "t2i" and max_sequence_length is not None:
        embeds, mask = embeds[:, :max_sequence_length], mask[:, :max_sequence_length]
    return embeds, mask


def mask_or_none(mask: np.ndarray) -> np.ndarray | None:
    """diffusers' convention: no mask when every position is valid."""
    return None if np.all(mask) else mask


# --- buckets --------------------------------------------------------------------------------------
def bucket_length(n: int, multiple: int = BUCKET_MULTIPLE) -> int:
    """Smallest ladder size ≥ n: `multiple` * {1, 2, 3, 4, 6, 8, 12, 16, 24, …} (2^k and 3 * 2^(k-1))."""
    units = max(1, -(-n // multiple))
    power = 1 << (units - 1).bit_length()  # next power of two ≥ units
    return multiple * (3 * power // 4 if power >= 4 and units <= 3 * power // 4 else power)


def _pad_axis(x: np.ndarray, length: int, value, axis: int, side: str) -> np.ndarray:
    """Pad `axis` of `x` to `length` with `value` on `side`."""
    extra = length - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad length {x.shape[axis]} down to {length}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra) if side == "right" else (extra, 0)
    return np.pad(x, widths, constant_values=value)


def pad_inputs(inputs: TextEncoderInputs, pad_token_id: int, *, length: int | None = None,
               num_patches: int | None = None, batch: int | None = None,
               padding_side: str = "right") -> TextEncoderInputs:
    """Pad a batch to a bucket: tokens to `length` (default `bucket_length`), patch rows to `num_patches`
    (default `bucket_length` of the patch count), rows to `batch` (extra rows all padding).

    Padded tokens: pad id, attention mask 0, mm type 0. Padded patches: zero rows. `image_grid_thw` is
    unchanged, so the valid patch count stays `sum(prod(grid))`.
    """
    n = inputs.input_ids.shape[1]
    length = bucket_length(n) if length is None else length
    ids = _pad_axis(inputs.input_ids, length, pad_token_id, 1, padding_side)
    mask = _pad_axis(inputs.attention_mask, length, 0, 1, padding_side)
    mm = _pad_axis(inputs.mm_token_type_ids, length, 0, 1, padding_side)
    if batch is not None:
        ids, mask, mm = (_pad_axis(a, batch, v, 0, "right") for a, v in ((ids, pad_token_id), (mask, 0), (mm, 0)))
    pixels = inputs.pixel_values
    if pixels is not None:
        pixels = _pad_axis(pixels, bucket_length(len(pixels)) if num_patches is None else num_patches, 0.0, 0, "right")
    rows = inputs.images_per_row + (0,) * (ids.shape[0] - len(inputs.images_per_row))
    return dataclasses.replace(inputs, input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                               pixel_values=pixels, images_per_row=rows)
