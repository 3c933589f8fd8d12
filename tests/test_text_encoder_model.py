"""Qwen2.5-VL encoder parity with transformers 5.24 `Qwen2_5_VLForConditionalGeneration` (fp32, CPU).

The reference is called as the model was trained: with `mm_token_type_ids` (3D M-RoPE for image
tokens) and `output_hidden_states=True`, comparing `hidden_states[-1]` on the valid tokens.
Tiny config: images spanning several windows (partial ones at the edges), full-attention blocks,
two images in one prompt, a padded batch of two.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import text_encoder_reference as R  # noqa: E402
from tests.compare import assert_close, assert_differs  # noqa: E402
from qwen_edit_jax.loading.text_encoder import load_text_encoder_model  # noqa: E402
from qwen_edit_jax.models.text_encoder import VisionShape, get_rope_index, vision_layout, vision_shape  # noqa: E402

# Tolerances ≈ 10× the error measured on 2026-12-07 (2-core CPU; tests/compare.py says how to re-measure).
HIDDEN_TOL = 4e-5  # measured 3.1e-6 (both padding sides)
TEXT_TOL = 1e-5  # measured 9.3e-7
VISION_TOL = 2e-5  # measured 1.4e-6
PAD_TOL = 5e-6  # measured 4.3e-7 (padded vs natural layout, ours both)
POSITIONS_DIFFER = 1e-2  # the 1D / 3D position guard: measured 0.54


@pytest.fixture(scope="module")
def torch_model():
    return R.make_torch_model()


@pytest.fixture(scope="module")
def model(torch_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("te")
    torch_model.save_pretrained(folder)  # original (legacy) names: model.*, visual.*
    return load_text_encoder_model(folder, dtype=jnp.float32)


@pytest.mark.parametrize("side", ["right", "left"])
def test_hidden_states_match_transformers(model, torch_model, side):
    ids, mask, pv, grid = R.make_inputs(side)
    ref = R.torch_hidden(torch_model, ids, mask, pv, grid)
    ours = np.asarray(model(ids, mask, pv, grid))
    assert np.isfinite(ours).all()
    assert_close(ours, ref, HIDDEN_TOL, f"hidden states, {side} padding", mask)


def test_one_dimensional_positions_are_measurably_different(model, torch_model):
    """Guard: without mm_token_type_ids transformers ≥ 5.15 uses 1D positions; ours must not."""
    ids, mask, pv, grid = R.make_inputs("right")
    ref3d = R.torch_hidden(torch_model, ids, mask, pv, grid)
    ref1d = R.torch_hidden(torch_model, ids, mask, pv, grid, mm_token_type_ids=False)
    ours = np.asarray(model(ids, mask, pv, grid))
    assert_differs(ref1d, ref3d, POSITIONS_DIFFER, "transformers 1D vs 3D positions", mask)
    assert_differs(ours, ref1d, POSITIONS_DIFFER, "ours vs transformers 1D positions", mask)


def test_text_only_matches_transformers(model, torch_model):
    ids, mask, _, _ = R.make_inputs("right")
    ids, mask = np.where(ids == R.IMAGE, 7, ids), mask  # no images: plain 1D positions
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          output_hidden_states=True).hidden_states[-1].numpy()
    assert_close(np.asarray(model(ids, mask)), ref, TEXT_TOL, "text-only hidden states", mask)


def test_vision_tower_matches_transformers(model, torch_model):
    _, _, pv, grid = R.make_inputs()
    with torch.no_grad():
        ref = torch_model.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    lay = vision_layout(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    assert_close(np.asarray(model.visual(jnp.asarray(pv), lay)), ref, VISION_TOL, "vision tower")


@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_index_matches_transformers(torch_model, side):
    ids, mask, _, grid = R.make_inputs(side)
    ref, ref_delta = torch_model.model.get_rope_index(
        torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == R.IMAGE).astype(np.int64)),
        image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask))
    pos, delta = get_rope_index(ids, grid, mask, image_token_id=R.IMAGE, spatial_merge_size=2)
    np.testing.assert_array_equal(pos, ref.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())


@pytest.mark.parametrize("grids,window", [(R.GRIDS, 112), ([(2, 8, 12), (1, 16, 4)], 112), ([(1, 6, 10)], 56)])
def test_vision_layout_matches_transformers(grids, window):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    g = torch.tensor(grids)
    win_idx, cu_win = get_vision_window_index(g, spatial_merge_size=2, window_size=window, patch_size=14)
    cu_full = get_vision_cu_seqlens(g)
    pos = get_vision_position_ids(g, 2)
    lay = vision_layout(grids, spatial_merge_size=2, window_size=window, patch_size=14)
    np.testing.assert_array_equal(lay.window_index, win_idx.numpy())
    np.testing.assert_array_equal(lay.window_index[lay.reverse_index], np.arange(len(lay.window_index)))
    for groups, cu in ((lay.windows, cu_win.numpy()), (lay.full, cu_full.numpy())):
        np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(groups.valid.sum(1))]), cu)
        np.testing.assert_array_equal(groups.gather[groups.valid], np.arange(cu[-1]))  # contiguous, in order
        np.testing.assert_array_equal(groups.gather.reshape(-1)[groups.scatter], np.arange(cu[-1]))
    expected_pos = pos.numpy().reshape(-1, 4, 2)[win_idx.numpy()].reshape(-1, 2)
    np.testing.assert_array_equal(lay.rot_pos, expected_pos)


def test_mismatched_image_tokens_raise(model):
    ids, mask, pv, grid = R.make_inputs("right")
    with pytest.raises(ValueError, match="does not match image grid"):
        model(ids, mask, pv, grid[[1, 0, 2]])
    with pytest.raises(ValueError, match="image_grid_thw has 4 rows"):
        model(ids, mask, pv, np.concatenate([grid, grid[:1]]))
    with pytest.raises(ValueError, match="patches"):
        model(ids, mask, pv[:-4], grid)
    with pytest.raises(ValueError, match="video tokens"):
        model(np.concatenate([ids[:, :1] * 0 + R.VIDEO, ids], 1), np.pad(mask, ((0, 0), (1, 0)), constant_values=1),
              pv, grid)


@pytest.mark.parametrize("grids", [R.GRIDS, [(1, 4, 6)], [(2, 8, 12), (1, 16, 4)]])
def test_vision_shape_is_the_unpadded_layout(grids):
    lay = vision_layout(grids, spatial_merge_size=2, window_size=112, patch_size=14)
    shape = vision_shape(grids, spatial_merge_size=2, window_size=112, patch_size=14)
    assert (shape.num_patches, shape.num_windows, shape.window_len, shape.num_frames, shape.frame_len) == (
        len(lay.rot_pos), *lay.windows.valid.shape, *lay.full.valid.shape)


def test_padded_vision_layout_gives_the_same_features(model):
    """Bucket padding (patch rows, empty window / image groups, longer groups) leaves the features alone."""
    _, _, pv, grid = R.make_inputs()
    kw = dict(spatial_merge_size=2, window_size=112, patch_size=14)
    natural = vision_shape(grid, **kw)
    padded = VisionShape(num_patches=natural.num_patches + 64, num_windows=natural.num_windows + 3, window_len=64,
                         num_frames=natural.num_frames + 2, frame_len=natural.frame_len + 40)
    ref = np.asarray(model.visual(jnp.asarray(pv), vision_layout(grid, **kw)))
    pv_padded = np.concatenate([pv, np.random.default_rng(0).standard_normal((64, pv.shape[1]), np.float32)])
    ours = np.asarray(model.visual(jnp.asarray(pv_padded), vision_layout(grid, shape=padded, **kw)))
    assert ours.shape == (padded.num_patches // 4, ref.shape[1]) and np.isfinite(ours).all()
    assert_close(ours[:len(ref)], ref, PAD_TOL, "padded vs natural vision layout")
    with pytest.raises(ValueError, match="cannot pad"):
        vision_layout(grid, shape=dataclasses.replace(natural, num_windows=natural.num_windows - 1), **kw)
