"""Host-side (numpy) index computations that depend on the data: M-RoPE positions and the vision layout.

Both depend only on token ids, the attention mask and `image_grid_thw`, never on activations, so
they are computed on the host before the compiled forward pass and handed to it as arrays (their
shapes fix the compiled program: one program per sequence length × image-size bucket).

- `get_rope_index`: transformers' `Qwen2_5_VLModel.get_rope_index` with
  `mm_token_type_ids = (input_ids == image_token_id)` — the 3D positions the model was trained
  with (transformers ≥ 5.15 silently falls back to 1D positions when that argument is absent).
- `vision_layout`: transformers' `get_vision_window_index`, `get_vision_position_ids` and
  `get_vision_cu_seqlens`, turned into gather/scatter indices so that window attention and
  per-image full attention become batched attention over padded groups with a key mask.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np


def _runs(flags: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values: [(value, start, end)] (itertools.groupby in transformers)."""
    if flags.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [flags.size]])
    return [(bool(flags[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def as_grid(image_grid_thw: np.ndarray | Sequence[Sequence[int]] | None) -> np.ndarray:
    """`image_grid_thw` as an int64 `[n_images, 3]` array (t, h, w in patches)."""
    grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3 or (grid <= 0).any():
        raise ValueError(f"image_grid_thw must be [n_images, 3] positive (t, h, w); got {grid.tolist()}")
    return grid


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    video_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids `[3, B, L]` (t, h, w) and `rope_deltas` `[B, 1]`.

    Text tokens get t = h = w = running index; each run of image tokens takes the next grid
    and gets t = start + frame, h = start + row, w = start + column on the merged grid; text
    after an image resumes at start + max(h, w) / merge. Padding (mask 0) gets 0. Images are
    consumed in order across the batch. Unlike transformers, a run whose length does not match
    its grid, a grid left over, or video tokens raise instead of silently misaligning.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L]; got shape {ids.shape}")
    b, n = ids.shape
    mask = np.ones((b, n), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    grids = as_grid(image_grid_thw)
    m = spatial_merge_size
    position_ids = np.zeros((3, b, n), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    used = 0
    for i in range(b):
        tokens = ids[i][mask[i]]
        if video_token_id is not None and (tokens == video_token_id).any():
            raise ValueError(f"sample {i}: video tokens ({video_token_id}) are not supported")
        parts, cur = [], 0
        for is_image, s, e in _runs(tokens == image_token_id):
            if not is_image:
                parts.append(np.broadcast_to(np.arange(e - s) + cur, (3, e - s)))
                cur += e - s
                continue
            if used >= len(grids):
                raise ValueError(f"sample {i}: more runs of image tokens than image_grid_thw rows ({len(grids)})")
            t, h, w = (int(v) for v in grids[used])
            used += 1
            if h % m or w % m or e - s != t * (h // m) * (w // m):
                raise ValueError(f"sample {i}: a run of {e - s} image tokens does not match image grid {[t, h, w]} "
                                 f"(needs t·h·w/{m * m} = {t * h * w // (m * m)} tokens, h and w divisible by {m})")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(h, w) // m
        if parts:
            pos = np.concatenate(parts, axis=1)
            position_ids[:, i, mask[i]] = pos
            deltas[i, 0] = pos.max() + 1 - len(tokens)
    if used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the sequences hold {used} images")
    return position_ids, deltas


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Groups:
    """A partition of the (window-ordered) patch sequence into contiguous attention groups.

    gather `[G, S]`: sequence index of slot s of group g (0 in padded slots); valid `[G, S]`:
    slot holds a token (the key mask); scatter `[N]`: flat slot (g·S + s) of each token.
    """

    gather: np.ndarray
    valid: np.ndarray
    scatter: np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Everything the vision tower needs besides pixels, for one list of images.

    window_index `[N/4]`: merged-cell order for window attention (transformers' `window_index`);
    reverse_index `[N/4]`: its inverse (`argsort`), restoring raster order after the merger;
    rot_pos `[N, 2]`: (row, column) patch coordinates, already in window order;
    windows / full: attention groups for window blocks (`cu_window_seqlens`) and for
    full-attention blocks (`cu_seqlens`: one group per image frame).
    """

    window_index: np.ndarray
    reverse_index: np.ndarray
    rot_pos: np.ndarray
    windows: Groups
    full: Groups


def groups_from_lengths(lengths: Sequence[int], *, num_groups: int | None = None, group_len: int | None = None,
                        num_tokens: int | None = None) -> Groups:
    """Contiguous groups of the given lengths, padded to the longest (or to `group_len`).

    Padding for static shapes (one compiled program per bucket): `num_groups` adds empty groups,
    each with one valid slot on token 0 so no softmax row is empty (their outputs are never
    read); `num_tokens` adds tokens after the grouped ones that belong to no group (padded
    patches), which read slot 0 back.
    """
    lengths = np.asarray(lengths, np.int64)
    n_real = int(lengths.sum())
    g = len(lengths) if num_groups is None else num_groups
    s = int(lengths.max()) if group_len is None else group_len
    n = n_real if num_tokens is None else num_tokens
    if g < len(lengths) or s < lengths.max() or n < n_real:
        raise ValueError(f"cannot pad {len(lengths)} groups of up to {int(lengths.max())} over {n_real} tokens "
                         f"down to {g} groups of {s} over {n} tokens")
    lengths = np.concatenate([lengths, np.zeros(g - len(lengths), np.int64)])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    slot = np.arange(s)
    valid = slot[None, :] < lengths[:, None]
    gather = np.where(valid, starts[:, None] + slot[None, :], 0)
    scatter = np.concatenate([(np.arange(g)[:, None] * s + slot[None, :])[valid], np.zeros(n - n_real, np.int64)])
    valid[lengths == 0, 0] = True
    return Groups(gather.astype(np.int32), valid, scatter.astype(np.int32))


def _patch_positions(t: int, h: int, w: int, m: int) -> np.ndarray:
    """(row, col) of each patch in processor order (grouped per m×m merge cell), repeated per frame."""
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // m, m, w // m, m)
    hh = hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    ww = ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hh, ww], axis=-1), (t, 1))


def _windows(t: int, gh: int, gw: int, win: int) -> list[np.ndarray]:
    """Merged-cell ids of each non-empty window, per frame, windows row-major, cells row-major."""
    cells = np.arange(t * gh * gw).reshape(t, gh, gw)
    out = []
    for f in range(t):
        for r in range(0, gh, win):
            for c in range(0, gw, win):
                out.append(cells[f, r:r + win, c:c + win].reshape(-1))
    return out


@dataclasses.dataclass(frozen=True)
class VisionShape:
    """The static sizes of a `VisionLayout`, i.e. of the compiled vision program.

    num_patches: patch rows (≥ the images' Σ t·h·w; a multiple of the merge unit); num_windows ×
    window_len: the window-attention groups; num_frames × frame_len: the full-attention groups
    (one per image frame).
    """

    num_patches: int
    num_windows: int
    window_len: int
    num_frames: int
    frame_len: int


def vision_layout(
    image_grid_thw: np.ndarray | Sequence[Sequence[int]],
    *,
    spatial_merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
    shape: VisionShape | None = None,
) -> VisionLayout:
    """The vision tower's index arrays for images with patch grids `image_grid_thw` ([n, 3]).

    `shape` pads the layout to static sizes (≥ `vision_shape` of the same grids): padded patch
    rows come after the images' patches, sit in no attention group and are dropped after the
    merger (their merged cells come last in raster order too, so image features stay first).
    """
    grids = as_grid(image_grid_thw)
    if len(grids) == 0:
        raise ValueError("vision_layout needs at least one image")
    m = spatial_merge_size
    unit = m * m
    win = window_size // m // patch_size
    order, win_lens, frame_lens, pos = [], [], [], []
    offset = 0
    for t, h, w in (tuple(int(v) for v in row) for row in grids):
        if h % m or w % m:
            raise ValueError(f"image grid {[t, h, w]}: h and w must be divisible by spatial_merge_size {m}")
        for cells in _windows(t, h // m, w // m, win):
            order.append(cells + offset)
            win_lens.append(len(cells) * unit)
        frame_lens += [h * w] * t
        pos.append(_patch_positions(t, h, w, m))
        offset += t * (h // m) * (w // m)
    n_patches = offset * unit
    if shape is None:
        shape = VisionShape(n_patches, len(win_lens), max(win_lens), len(frame_lens), max(frame_lens))
    if shape.num_patches % unit or shape.num_patches < n_patches:
        raise ValueError(f"num_patches {shape.num_patches} must be a multiple of {unit} and ≥ the images' "
                         f"{n_patches} patches")
    window_index = np.concatenate(order + [np.arange(offset, shape.num_patches // unit)])
    rot_pos = np.concatenate(pos).reshape(-1, unit, 2)[window_index[:offset]].reshape(-1, 2)
    rot_pos = np.concatenate([rot_pos, np.zeros((shape.num_patches - n_patches, 2), rot_pos.dtype)])
    return VisionLayout(
        window_index=window_index.astype(np.int32),
        reverse_index=np.argsort(window_index).astype(np.int32),
        rot_pos=rot_pos.astype(np.int32),
        windows=groups_from_lengths(win_lens, num_groups=shape.num_windows, group_len=shape.window_len,
                                    num_tokens=shape.num_patches),
        full=groups_from_lengths(frame_lens, num_groups=shape.num_frames, group_len=shape.frame_len,
                                 num_tokens=shape.num_patches),
    )


def vision_shape(
    image_grid_thw: np.ndarray | Sequence[Sequence[int]],
    *,
    spatial_merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
) -> VisionShape:
    """The unpadded sizes of `vision_layout` for these grids (what a bucket must cover)."""
    grids = as_grid(image_grid_thw)
    m = spatial_merge_size
    win = window_size // m // patch_size
    n_windows = sum(int(t) * -(-int(h) // m // win) * -(-int(w) // m // win) for t, h, w in grids)
    return VisionShape(
        num_patches=int(np.prod(grids, axis=1).sum()),
        num_windows=n_windows,
        window_len=max((min(win, int(h) // m) * min(win, int(w) // m) * m * m for _, h, w in grids), default=0),
        num_frames=int(grids[:, 0].sum()),
        frame_len=int(max((h * w for _, h, w in grids), default=0)),
    )
