"""Tiny transformers Qwen2.5-VL reference models and inputs for the text-encoder tests.

Every parameter is random (norms around 1, biases small, weights 1/√fan_in), the vocabulary is
small with the special tokens remapped (as transformers' own tester does), and the vision config
makes images span several 112-px windows, including partial windows at the edges.
"""

from __future__ import annotations

import json
import os

import numpy as np

IMAGE, VIDEO, V_START, V_END = 90, 91, 92, 93
TEXT = dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=None, pad_token_id=0)
VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
              fullatt_block_indexes=[1, 3], window_size=112, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2)
# patch grids (t, h, w): 12×20 patches = 6×10 merged cells = 2×3 windows of 4×4 cells, the last
# row and column partial; 8×8 = exactly one window; 4×6 = one partial window
GRIDS = [(1, 12, 20), (1, 8, 8), (1, 4, 6)]


def torch_config(text: dict | None = None, vision: dict | None = None, token_ids: dict | None = None):
    """The tiny `Qwen2_5_VLConfig`; `text` / `vision` update the sub-configs, `token_ids` the special ids."""
    from transformers import Qwen2_5_VLConfig

    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END)
    return Qwen2_5_VLConfig(text_config={**TEXT, **(text or {})}, vision_config={**VISION, **(vision or {})},
                            **{**ids, **(token_ids or {})})


def make_torch_model(seed: int = 0, **config_overrides):
    """`Qwen2_5_VLForConditionalGeneration` (fp32, eval) with every parameter random (`torch_config` overrides)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(torch_config(**config_overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
    return model


def image_tokens(grid) -> int:
    t, h, w = grid
    return t * h * w // 4


def make_inputs(padding_side: str = "right", seed: int = 0):
    """A batch of two prompts: sample 0 holds images 0 and 1 ("Picture i:" style), sample 1 image 2,
    plus one text-only stretch; padded to one length. Returns numpy arrays."""
    rng = np.random.default_rng(seed)
    text = lambda n: list(rng.integers(1, 80, n))  # noqa: E731
    vis = lambda g: [V_START] + [IMAGE] * image_tokens(g) + [V_END]  # noqa: E731
    rows = [text(6) + vis(GRIDS[0]) + text(3) + vis(GRIDS[1]) + text(5),
            text(4) + vis(GRIDS[2]) + text(9)]
    n = max(map(len, rows))
    ids = np.zeros((2, n), np.int64)
    mask = np.zeros((2, n), np.int64)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(n - len(r), n)
        ids[i, sl], mask[i, sl] = r, 1
    patches = sum(t * h * w for t, h, w in GRIDS)
    pixel_values = rng.standard_normal((patches, 3 * 2 * 14 * 14)).astype(np.float32)
    return ids, mask, pixel_values, np.array(GRIDS, np.int64)


def torch_hidden(model, ids, mask, pixel_values, grid, *, mm_token_type_ids: bool = True) -> np.ndarray:
    """The reference `hidden_states[-1]`, called as the model was trained (3D positions) unless
    `mm_token_type_ids=False` (what diffusers does with transformers ≥ 5.15: 1D positions)."""
    import torch

    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(grid), output_hidden_states=True)
    if mm_token_type_ids:
        kw["mm_token_type_ids"] = torch.tensor((ids == IMAGE).astype(np.int64))
    with torch.no_grad():
        out = model(**kw)
    return out.hidden_states[-1].float().numpy()



def save_transformers5(model, folder: str) -> str:
    """`save_pretrained` with transformers-5 names (`model.language_model.*`, `model.visual.*`), one file."""
    model.save_pretrained(folder, save_original_format=False)
    return folder


def save_legacy(model, folder: str) -> str:
    """`save_pretrained` in the original names (`model.*`, `visual.*`, transformers' default), as index +
    shards, with config.json rewritten in the flat transformers-4.x layout of the released checkpoints."""
    model.save_pretrained(folder, max_shard_size="150KB")
    flat = {k: v for k, v in TEXT.items() if k != "rope_scaling"}
    flat.update(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], rope_theta=1e6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, use_sliding_window=False,
                sliding_window=32768, max_window_layers=2, image_token_id=IMAGE, video_token_id=VIDEO,
                vision_start_token_id=V_START, vision_end_token_id=V_END, torch_dtype="float32",
                vision_config={**VISION, "in_chans": 3, "model_type": "qwen2_5_vl"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(flat, f, indent=1)
    return folder
