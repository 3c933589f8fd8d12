"""Qwen2.5-VL prompt encoding throughput: this project's JAX encoder vs transformers, same weights.

One run builds a tiny-but-not-trivial random `Qwen2_5_VLForConditionalGeneration` (fp32), loads
its weights into `Qwen25VLEncoder` through the real loader, checks parity, and times a batch of
prompts with one image each (host preparation included for JAX; the torch reference gets
`mm_token_type_ids`). Torch runs on CUDA when available, else CPU; JAX on its default backend.
The JSON last line holds prompts/s for both and the ratio.

    JAX_PLATFORMS=cpu python benchmarks/text_encoder.py --batch 2 --image 392
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import time_fn  # noqa: E402

IMAGE, VIDEO, V_START, V_END = 990, 991, 992, 993


def build_torch(seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                         bos_token_id=None, eos_token_id=None, pad_token_id=0),
        vision_config=dict(depth=8, hidden_size=128, intermediate_size=384, num_heads=4, out_hidden_size=256,
                           fullatt_block_indexes=[3, 7]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    return model


def make_batch(batch: int, image_px: int, text_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = image_px // 14
    n_img = g * g // 4
    rows = [list(rng.integers(1, 900, text_len // 2)) + [V_START] + [IMAGE] * n_img + [V_END]
            + list(rng.integers(1, 900, text_len - text_len // 2)) for _ in range(batch)]
    ids = np.array(rows, np.int64)
    mask = np.ones_like(ids)
    pv = rng.standard_normal((batch * g * g, 1176)).astype(np.float32)
    return ids, mask, pv, np.array([[1, g, g]] * batch, np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--image", type=int, default=392, help="image side in px (multiple of 28)")
    ap.add_argument("--text", type=int, default=48, help="text tokens per prompt")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from qwen_edit_jax.loading.text_encoder import load_text_encoder_model

    tm = build_torch()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tm.save_pretrained(tmp)
        model = load_text_encoder_model(tmp, dtype=jnp.float32)
    tm = tm.to(dev)
    ids, mask, pv, grid = make_batch(args.batch, args.image, args.text)

    def run_torch():
        with torch.no_grad():
            out = tm(input_ids=torch.tensor(ids, device=dev), attention_mask=torch.tensor(mask, device=dev),
                     pixel_values=torch.tensor(pv, device=dev), image_grid_thw=torch.tensor(grid, device=dev),
                     mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64), device=dev),
                     output_hidden_states=True).hidden_states[-1]
        return out.float().cpu().numpy()

    def run_jax():
        return np.asarray(jax.block_until_ready(model(ids, mask, pv, grid)))

    ref, ours = run_torch(), run_jax()
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    t_torch = time_fn(run_torch, iters=args.iters, warmup=1)
    t_jax = time_fn(run_jax, iters=args.iters, warmup=1)
    result = {
        "benchmark": "text_encoder", "batch": args.batch, "image_px": args.image, "seq_len": int(ids.shape[1]),
        "jax_backend": jax.default_backend(), "torch_device": dev, "fp32_rel_err": rel,
        "jax_prompts_per_s": args.batch / t_jax["median_s"], "torch_prompts_per_s": args.batch / t_torch["median_s"],
        "jax_over_torch": t_torch["median_s"] / t_jax["median_s"], "clean_timing": t_jax["clean"] and t_torch["clean"],
    }
    print(f"JAX {result['jax_prompts_per_s']:.2f} prompts/s, transformers {result['torch_prompts_per_s']:.2f} "
          f"prompts/s (×{result['jax_over_torch']:.2f}); fp32 rel err {rel:.1e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
