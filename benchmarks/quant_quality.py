"""How much a quantized frozen base (int8 / fp8 / int4) changes the DiT's output and sampled latents.

    python benchmarks/quant_quality.py --layers 2 --json        # full width (3072, 24 heads), 2 blocks, CPU

Builds the real-width architecture with `--layers` blocks and random weights with heavy-tailed,
per-channel-varying statistics (no released weights are downloaded; see `make_weights`), then
compares against the fp32 model:
  1. one forward pass (edit layout: target + reference tokens + text) — relative L2 error of the
     output for bf16, int8, fp8 and int4 bases (bf16 activations; int4 at each `--int4-groups` size),
     and int8 / int4 with fp32 activations;
  2. the compiled true-CFG sampling loop (`sampling.sample`) from the same noise (fixed seed):
     relative L2 distance of the final latents of each variant to bf16 and to fp32.
Every variant is built from the same float weights through `loading.model_from_params`
(quantize-on-load). The last line with `--json` is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen-image-edit")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--grid", type=int, nargs=2, default=(4, 8), help="packed-token grid (h, w) of target and reference")
    p.add_argument("--txt-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="sampling steps (0: skip sampling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int4-groups", default="64,128", help="int4 group sizes to compare (input rows per scale)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def make_weights(cfg, seed: int) -> dict[str, np.ndarray]:
    """Float weights with realistic-looking statistics (an assumption, not measured on Qwen-Image):
    kernels = Student-t (ν = 5) noise, std 1/√fan_in, times a log-normal per-output-channel gain
    (σ = 0.5, as trained linears show channels of very different norm), plus 0.05 % outlier
    entries ×8 (the heavy tail that makes per-channel int8 lose its low bits); biases N(0, 0.02);
    norm scales 1 + N(0, 0.1)."""
    import qwen_edit_jax as q
    from flax import nnx

    from qwen_edit_jax.config import ModelOptions
    from qwen_edit_jax.models.dit import BASE_PARAMS

    rng = np.random.default_rng(seed)
    abstract = nnx.state(q.abstract_model(cfg, ModelOptions()), BASE_PARAMS)
    out = {}
    for path, v in nnx.to_flat_state(abstract):
        key, shape = ".".join(map(str, path)), tuple(v.get_value().shape)
        if key.endswith(".kernel"):
            stacked = key.startswith("transformer_blocks.")
            fan_in = shape[1] if stacked else shape[0]
            w = rng.standard_t(5, size=shape).astype(np.float32) * np.float32(np.sqrt(3 / 5) / np.sqrt(fan_in))
            gshape = (shape[0], 1, *shape[2:]) if stacked else (1, *shape[1:])
            w *= rng.lognormal(0.0, 0.5, size=gshape).astype(np.float32)
            mask = rng.random(shape, dtype=np.float32) < 5e-4
            w[mask] *= 8.0
            out[key] = w
        elif key.endswith(".bias"):
            out[key] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[key] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    import qwen_edit_jax as q
    from qwen_edit_jax import config as qconfig
    from qwen_edit_jax.config import ModelOptions
    from qwen_edit_jax.loading.dit import model_from_params
    from qwen_edit_jax.sampling import sample

    cfg = dataclasses.replace(q.preset(args.preset), num_layers=args.layers)
    t0 = time.perf_counter()
    params = make_weights(cfg, args.seed)
    h, w = args.grid
    n = h * w
    rng = np.random.default_rng(args.seed + 1)
    x = rng.standard_normal((1, 2 * n, cfg.in_channels)).astype(np.float32)
    txt = rng.standard_normal((1, args.txt_tokens, cfg.joint_attention_dim)).astype(np.float32)
    neg = rng.standard_normal((1, args.txt_tokens // 2, cfg.joint_attention_dim)).astype(np.float32)
    mask = np.ones((1, args.txt_tokens), bool)
    shapes = [(1, h, w), (1, h, w)]
    noise = rng.standard_normal((1, n, cfg.in_channels)).astype(np.float32)
    variants = {
        "fp32": dict(param_dtype="float32", dtype="float32"),
        "bf16": dict(param_dtype="bfloat16", dtype="bfloat16"),
        "int8": dict(param_dtype="bfloat16", dtype="bfloat16", quantize="int8"),
        "fp8": dict(param_dtype="bfloat16", dtype="bfloat16", quantize="fp8"),
        "int8_fp32_act": dict(param_dtype="float32", dtype="float32", quantize="int8"),
        "int4_fp32_act": dict(param_dtype="float32", dtype="float32", quantize="int4"),
    }
    groups = [int(g) for g in args.int4_groups.split(",") if g.strip()]
    variants.update({f"int4_g{g}": dict(param_dtype="bfloat16", dtype="bfloat16", quantize="int4", group=g)
                     for g in groups})
    default_group = qconfig.INT4_GROUP_SIZE
    outs, lats = {}, {}
    for name, kw in variants.items():
        kw = dict(kw)
        qconfig.INT4_GROUP_SIZE = kw.pop("group", default_group)  # the group size a benchmark run compares
        model = model_from_params(cfg, ModelOptions(**kw), params)
        dt = model.options.dtype
        outs[name] = np.asarray(model(jnp.asarray(x, dt), jnp.asarray(txt, dt), jnp.asarray(mask),
                                      jnp.asarray([0.6], jnp.float32), [shapes]), np.float32)
        if args.steps:
            lats[name] = np.asarray(sample(
                model, noise=jnp.asarray(noise, dt), image_latents=jnp.asarray(x[:, n:], dt),
                prompt_embeds=jnp.asarray(txt, dt), prompt_embeds_mask=jnp.asarray(mask),
                negative_prompt_embeds=jnp.asarray(neg, dt),
                negative_prompt_embeds_mask=jnp.ones((1, neg.shape[1]), bool),
                true_cfg_scale=4.0, num_inference_steps=args.steps, img_shapes=shapes), np.float32)
        del model
        gc.collect()
    qconfig.INT4_GROUP_SIZE = default_group
    result = {
        "int4_group_default": default_group,
        "preset": args.preset, "layers": args.layers, "width": cfg.inner_dim, "tokens": {"image": 2 * n,
                                                                                       "text": args.txt_tokens},
        "weights": "student-t(5) x lognormal(0.5) per-channel gain, 0.05% x8 outliers (synthetic)",
        "output_rel_err_vs_fp32": {k: rel(v, outs["fp32"]) for k, v in outs.items() if k != "fp32"},
        "output_rel_err_vs_bf16": {k: rel(v, outs["bf16"]) for k, v in outs.items() if k not in ("bf16",)},
        "steps": args.steps,
        "latents_rel_err_vs_fp32": {k: rel(v, lats["fp32"]) for k, v in lats.items() if k != "fp32"},
        "latents_rel_err_vs_bf16": {k: rel(v, lats["bf16"]) for k, v in lats.items() if k != "bf16"},
        "seconds": time.perf_counter() - t0,
        "backend": jax.default_backend(),
    }
    for k in ("output_rel_err_vs_fp32", "output_rel_err_vs_bf16", "latents_rel_err_vs_fp32", "latents_rel_err_vs_bf16"):
        print(f"{k:26s} " + "  ".join(f"{n}={v:.4f}" for n, v in result[k].items()))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
