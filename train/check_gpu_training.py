#!/usr/bin/env python
"""GPU/TPU check of the training path in bf16 (XLA:CPU cannot run bf16 backward dots).

    python train/check_gpu_training.py [--out /tmp/gpu_check] [--steps 150]
    python train/check_gpu_training.py --dtype float32 --quick --steps 40     # CPU smoke test of the script

1. The demo (train/configs/latent_demo.yaml) with a bf16 base, bf16 activations and full remat: the loss
   must fall (mean of the last 20 steps < 0.8 × the first 20), and the LoRA file must be written.
2. One full LoRA step of two real-width blocks (24 heads × 128 = 3072, rank 32, bf16, remat full),
   1024 target + 1024 reference + 256 text tokens, with `xla` and `cudnn` attention: step_s.
Prints one JSON object as the last line; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_bf16(out: str, steps: int, dtype: str) -> dict:
    import numpy as np

    from qwen_edit_jax.testing.latent import CACHE_DIR, MODEL_DIR, write_latent_demo
    from qwen_edit_jax.training.config import load_config
    from qwen_edit_jax.training.loop import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    latent = write_latent_demo(os.path.join(out, "latent"))  # the demo's inputs (reused when there)
    cfg = load_config(os.path.join(root, "train", "configs", "latent_demo.yaml"), [
        f"model.path={latent / MODEL_DIR}", f"data.path={latent / CACHE_DIR}", f"model.param_dtype={dtype}",
        f"model.dtype={dtype}", "model.remat=full", f"train.max_steps={steps}", f"train.save_every={steps}",
        "train.progress=false"])
    t0 = time.perf_counter()
    res = train(cfg, os.path.join(out, "run"), log=lambda m: None)
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    first, last = float(np.mean(losses[:20])), float(np.mean(losses[-20:]))
    return {"demo_bf16_seconds": time.perf_counter() - t0, "demo_first20": first, "demo_last20": last,
            "demo_ok": bool(last < 0.8 * first and os.path.exists(res.lora_files[0]))}


def step_timing(attention: str, dtype: str, quick: bool) -> dict:
    import jax
    import numpy as np

    import qwen_edit_jax as q
    from qwen_edit_jax.training.config import ObjectiveSection, OptimSection
    from qwen_edit_jax.training.step import make_optimizer, make_train_step, split_lora

    cfg = q.preset("tiny") if quick else q.DiTConfig(num_layers=2)  # real width: 24 heads x 128, joint 3584
    opts = q.ModelOptions(param_dtype=dtype, dtype=dtype, remat="full", attention=attention,
                          lora=q.LoraConfig(rank=32))
    graphdef, params, base = split_lora(q.init_transformer(cfg, opts, seed=0))
    tx, _ = make_optimizer(OptimSection(), 100)
    step = make_train_step(graphdef, tx, ObjectiveSection())
    rng = np.random.default_rng(0)
    arrays = {"target": rng.standard_normal((1, 1, 1024, 64)).astype(np.float32),
              "references": rng.standard_normal((1, 1, 1024, 64)).astype(np.float32),
              "prompt_embeds": rng.standard_normal((1, 1, 256, cfg.joint_attention_dim)).astype(np.float32),
              "prompt_mask": np.ones((1, 1, 256), bool)}
    shapes = ((1, 32, 32), (1, 32, 32))
    opt, key, times = tx.init(params), jax.random.key(0), []
    for i in range(8):
        t0 = time.perf_counter()
        params, opt, m = step(params, opt, base, shapes, arrays, key, i)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return {f"step_s_{attention}": float(np.median(times[3:])), f"compile_s_{attention}": times[0],
            f"loss_finite_{attention}": bool(np.isfinite(float(m["loss"])))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/qwen_edit_jax_gpu_check")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--dtype", default="bfloat16", help="base and activation dtype (float32 for a CPU smoke test)")
    p.add_argument("--quick", action="store_true", help="time the tiny preset instead of real-width blocks")
    args = p.parse_args()
    import jax

    result = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform}
    result.update(demo_bf16(args.out, args.steps, args.dtype))
    for attention in ("xla", "cudnn" if result["platform"] == "gpu" else "chunked"):
        try:
            result.update(step_timing(attention, args.dtype, args.quick))
        except Exception as e:  # report, keep going
            result[f"step_error_{attention}"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(result, sort_keys=True))
    ok = result["demo_ok"] and all(v for k, v in result.items() if k.startswith("loss_finite"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
