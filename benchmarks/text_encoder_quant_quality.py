"""How much int8 / fp8 weights change Qwen2.5-VL's prompt embeddings (the text encoder for caching).

    python benchmarks/text_encoder_quant_quality.py --config tiny --json       # the tests' tiny random repo
    python benchmarks/text_encoder_quant_quality.py --config full --json       # 7B widths, 2 + 2 layers, CPU

`tiny`: the tiny repo the caching tests use (`testing.repo`, N(0, 1/fan_in) weights). `full`: the
real Qwen2.5-VL-7B widths (LM hidden 3584, MLP 18944, 28 heads / 4 KV heads; vision 1280 wide, MLP
3420, merger 5120 → 3584) with `--text-layers` / `--vision-layers` layers and a small vocabulary
(the embedding table stays float, its size changes nothing), weights drawn as
`benchmarks/quant_quality.py` draws the DiT's (Student-t, per-channel log-normal gains, rare
outliers; synthetic, no released weights are read). The float weights are written once as a
transformers `text_encoder/` folder and every variant is loaded from it by `load_text_encoder_model`
(the quantized ones quantize on load). One Edit-style prompt: text tokens around one image's
`<|image_pad|>` run, the image's patches random normalised pixels. Reported: relative L2 error of
the last hidden state (the prompt embeddings) over all tokens, the worst token, the text and the
image tokens, for bf16, int8, fp8 (bf16 activations) and int8 with fp32 activations, against fp32
and against bf16.
The last line with `--json` is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from quant_quality import rel  # noqa: E402

FULL_VOCAB = 4096  # token ids below; the 7B's 152,064-row table would only cost memory
FULL_IDS = {"image_token_id": 4001, "video_token_id": 4002, "vision_start_token_id": 4003,
            "vision_end_token_id": 4004}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["tiny", "full"], default="tiny")
    p.add_argument("--text-layers", type=int, default=2, help="full: language model layers")
    p.add_argument("--vision-layers", type=int, default=2, help="full: vision blocks (the last one full attention)")
    p.add_argument("--image", type=int, nargs=2, default=(224, 224), metavar=("H", "W"),
                   help="image size in pixels (multiples of 28)")
    p.add_argument("--text-tokens", type=int, default=48, help="prompt tokens around the image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def full_config_json(text_layers: int, vision_layers: int) -> dict:
    """A transformers-5 `config.json` with the 7B's widths and few layers."""
    return {
        "model_type": "qwen2_5_vl",
        "text_config": {"vocab_size": FULL_VOCAB, "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": text_layers, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "rms_norm_eps": 1e-6, "hidden_act": "silu",
                        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                                            "rope_theta": 1e6}},
        "vision_config": {"depth": vision_layers, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "fullatt_block_indexes": [vision_layers - 1], "window_size": 112,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                          "hidden_act": "silu"},
        **FULL_IDS,
    }


def realistic(shape: tuple[int, ...], name: str, rng: np.random.Generator) -> np.ndarray:
    """One checkpoint tensor (torch layout) with `quant_quality.make_weights`' statistics: a weight matrix is
    Student-t (ν = 5) noise of std 1/√fan_in times a log-normal (σ 0.5) gain per output row, plus 0.05 %
    entries ×8; biases N(0, 0.02); norm weights 1 + N(0, 0.1); the embedding table N(0, 1)."""
    if len(shape) == 1:
        norm = "norm" in name or "ln_q" in name
        return ((1.0 if norm else 0.0) + (0.1 if norm else 0.02) * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("embed_tokens.weight"):
        return rng.standard_normal(shape, dtype=np.float32)
    fan_in = int(np.prod(shape[1:]))
    w = rng.standard_t(5, size=shape).astype(np.float32) * np.float32(np.sqrt(3 / 5) / np.sqrt(fan_in))
    w *= rng.lognormal(0.0, 0.5, size=(shape[0],) + (1,) * (len(shape) - 1)).astype(np.float32)
    mask = rng.random(shape, dtype=np.float32) < 5e-4
    w[mask] *= 8.0
    return w


def write_full_folder(folder: str, text_layers: int, vision_layers: int, seed: int) -> str:
    from safetensors.numpy import save_file

    from qwen_edit_jax.models.text_encoder import Qwen25VLConfig
    from qwen_edit_jax.weights import text_encoder_keys as keys

    os.makedirs(folder, exist_ok=True)
    raw = full_config_json(text_layers, vision_layers)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f)
    config = Qwen25VLConfig.from_dict(raw)
    rng = np.random.default_rng(seed)
    shapes = keys.checkpoint_shapes(config, "transformers5")
    save_file({n: realistic(s, n, rng) for n, s in sorted(shapes.items())}, os.path.join(folder, "model.safetensors"))
    return folder


def edit_prompt(config, image_hw: tuple[int, int], text_tokens: int, seed: int):
    """(input_ids [1, L], pixel_values [N, 1176], image_grid_thw [1, 3]): text, vision start, the image's
    pad tokens, vision end, text; random token ids below the special ones and random normalised pixels."""
    v = config.vision_config
    h, w = (s // v.patch_size for s in image_hw)
    if h % v.spatial_merge_size or w % v.spatial_merge_size:
        raise ValueError(f"--image {image_hw}: sides must be multiples of {v.patch_size * v.spatial_merge_size}")
    rng = np.random.default_rng(seed)
    specials = min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                   config.vision_end_token_id)
    text = rng.integers(0, min(specials, config.text_config.vocab_size), text_tokens)
    n_image = h * w // v.merge_unit
    ids = np.concatenate([text[: text_tokens // 2], [config.vision_start_token_id], [config.image_token_id] * n_image,
                          [config.vision_end_token_id], text[text_tokens // 2:]])[None].astype(np.int32)
    pixels = np.clip(rng.standard_normal((h * w, v.patch_dim)), -1.8, 2.1).astype(np.float32)
    return ids, pixels, np.asarray([[1, h, w]], np.int64)


def worst_token(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1, a.shape[-1]), np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


VARIANTS = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(dtype="bfloat16", quantize="int8"),
    "fp8": dict(dtype="bfloat16", quantize="fp8"),
    "int8_fp32_act": dict(dtype="float32", quantize="int8"),
}


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from qwen_edit_jax.testing.repo import write_tiny_text_parts
    from qwen_edit_jax.loading.text_encoder import load_text_encoder_model, read_text_encoder_config

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="te_quant_") as tmp:
        if args.config == "tiny":
            folder = str(write_tiny_text_parts(tmp, args.seed) / "text_encoder")
            weights = "testing.repo: N(0, 1/fan_in) kernels (the tests' tiny repo)"
        else:
            folder = write_full_folder(os.path.join(tmp, "text_encoder"), args.text_layers, args.vision_layers,
                                       args.seed)
            weights = "student-t(5) x lognormal(0.5) per-channel gain, 0.05% x8 outliers (synthetic)"
        config = read_text_encoder_config(folder)
        ids, pixels, grid = edit_prompt(config, tuple(args.image), args.text_tokens, args.seed + 1)
        outs, seconds = {}, {}
        for name, kw in VARIANTS.items():
            t = time.perf_counter()
            model = load_text_encoder_model(folder, dtype=jnp.dtype(kw["dtype"]), quantize=kw.get("quantize"))
            outs[name] = np.asarray(model(ids, None, pixels, grid), np.float32)[0]
            seconds[name] = time.perf_counter() - t
            del model
            gc.collect()
    t, v = config.text_config, config.vision_config
    image = ids[0] == config.image_token_id
    result = {
        "benchmark": "text_encoder_quant_quality", "config": args.config,
        "text": {"hidden": t.hidden_size, "intermediate": t.intermediate_size, "layers": t.num_hidden_layers,
                 "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads},
        "vision": {"hidden": v.hidden_size, "intermediate": v.intermediate_size, "depth": v.depth},
        "weights": weights, "tokens": int(ids.shape[1]), "image_patches": int(pixels.shape[0]),
        "rel_err_vs_fp32": {k: rel(o, outs["fp32"]) for k, o in outs.items() if k != "fp32"},
        "rel_err_vs_bf16": {k: rel(o, outs["bf16"]) for k, o in outs.items() if k != "bf16"},
        "worst_token_rel_err_vs_fp32": {k: worst_token(o, outs["fp32"]) for k, o in outs.items() if k != "fp32"},
        "text_tokens_rel_err_vs_fp32": {k: rel(o[~image], outs["fp32"][~image]) for k, o in outs.items()
                                        if k != "fp32"},
        "image_tokens_rel_err_vs_fp32": {k: rel(o[image], outs["fp32"][image]) for k, o in outs.items()
                                         if k != "fp32"},
        "variant_seconds": seconds, "seconds": time.perf_counter() - t0, "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    for k in ("rel_err_vs_fp32", "rel_err_vs_bf16", "worst_token_rel_err_vs_fp32", "text_tokens_rel_err_vs_fp32",
              "image_tokens_rel_err_vs_fp32"):
        print(f"{k:28s} " + "  ".join(f"{n}={e:.4f}" for n, e in result[k].items()))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
