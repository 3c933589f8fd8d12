"""Seconds per denoising step: the JAX edit-sampling loop vs the same loop in diffusers.

    python benchmarks/sample.py --preset tiny                      # CPU, JAX vs diffusers
    python benchmarks/sample.py                                    # CPU, "medium" config (default)
    python benchmarks/sample.py --jax-only --dtype bf16 --layers 8 --heads 24 --head-dim 128 \
        --txt-dim 3584 --img-tokens 4096 --ref-tokens 4096 --txt-tokens 256 --attention cudnn --json   # GPU

Each run samples with true CFG (negative prompt), one target plus one reference image, and times the
whole `num_inference_steps` loop; s/step = loop time / steps. JAX runs the loop as one compiled
program, with cond+uncond batched (`batch_cfg`) and separately; diffusers runs
`tests/sampling_reference.diffusers_edit_loop` (the pipelines' loop) on the same weights and inputs.
The diffusers side needs the test extra (torch, diffusers); without it the JAX side runs alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from qwen_edit_jax.utils.accelerators import cpu_unless_accelerator  # noqa: E402

cpu_unless_accelerator()  # no libtpu probe noise on a CPU-only machine (JAX_PLATFORMS wins if set)

import jax
import jax.numpy as jnp
import numpy as np
from _timing import emit_json, print_table, reference_missing, time_fn
from train_step import add_model_args, grid, model_config, model_flops

import qwen_edit_jax as q
from qwen_edit_jax import sampling


def make_inputs(cfg: q.DiTConfig, args: argparse.Namespace) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    b, c, d = args.batch, cfg.in_channels, cfg.joint_attention_dim
    neg_len = max(1, args.txt_tokens // 2)
    pos_mask = np.ones((b, args.txt_tokens), np.int64)
    pos_mask[:, args.txt_tokens - args.txt_tokens // 8:] = 0  # some padding, as a batch of prompts has
    return {
        "noise": rng.standard_normal((b, args.img_tokens, c), dtype=np.float32),
        "refs": rng.standard_normal((b, args.ref_tokens, c), dtype=np.float32) if args.ref_tokens else None,
        "pos": rng.standard_normal((b, args.txt_tokens, d), dtype=np.float32) * pos_mask[..., None].astype(np.float32),
        "pos_mask": pos_mask,
        "neg": rng.standard_normal((b, neg_len, d), dtype=np.float32),
        "neg_mask": np.ones((b, neg_len), np.int64),
    }


def jax_runner(model, inp, shapes, args, batch_cfg: bool):
    dtype = model.options.dtype
    a = {k: None if v is None else jnp.asarray(v) for k, v in inp.items()}

    def run():
        return sampling.sample(
            model, noise=a["noise"].astype(dtype), image_latents=None if a["refs"] is None else a["refs"].astype(dtype),
            prompt_embeds=a["pos"].astype(dtype), prompt_embeds_mask=a["pos_mask"],
            negative_prompt_embeds=a["neg"].astype(dtype), negative_prompt_embeds_mask=a["neg_mask"],
            true_cfg_scale=4.0, num_inference_steps=args.steps, img_shapes=[shapes] * args.batch, batch_cfg=batch_cfg,
        ).block_until_ready()

    return run


def torch_runner(tm, inp, shapes, args):
    import torch

    from tests.sampling_reference import diffusers_edit_loop

    t = {k: None if v is None else torch.from_numpy(v) for k, v in inp.items()}

    def run():
        return diffusers_edit_loop(
            tm, latents=t["noise"], image_latents=t["refs"], prompt_embeds=t["pos"], prompt_embeds_mask=t["pos_mask"],
            negative_prompt_embeds=t["neg"], negative_prompt_embeds_mask=t["neg_mask"], true_cfg_scale=4.0,
            num_inference_steps=args.steps, img_shapes=[shapes] * args.batch)

    return run


def measure(runners: dict, iters: int) -> tuple[dict, dict]:
    """First call of each (compile + run), then `iters` rounds timing every runner once per round.

    Interleaving puts each implementation under the same background load (the machine is shared);
    ratios are taken per round, then the median.
    """
    outs, first, times, clean = {}, {}, {k: [] for k in runners}, {k: [] for k in runners}
    for name, run in runners.items():
        t0 = time.perf_counter()
        outs[name] = run()
        first[name] = time.perf_counter() - t0
    for _ in range(iters):
        for name, run in runners.items():
            r = time_fn(run, iters=1, warmup=0, min_clean=1)
            times[name].append(r["median_s"])
            clean[name].append(r["clean"])
    stats = {name: {"loop_s": statistics.median(times[name]), "first_call_s": first[name], "times": times[name],
                    "clean_rounds": sum(clean[name])} for name in runners}
    return stats, outs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_layers=4)
    p.add_argument("--img-tokens", type=int, default=256, help="target-image tokens")
    p.add_argument("--ref-tokens", type=int, default=256, help="reference-image tokens (0: text-to-image)")
    p.add_argument("--txt-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", default="auto", help="attention kernel (default: the library default, auto)")
    p.add_argument("--jax-only", action="store_true",
                   help="skip diffusers (GPU runs, big configs; automatic without the test extra)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); e.g. 1 under `taskset -c 0` for one core each")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if not args.jax_only and reference_missing("torch", "diffusers"):
        args.jax_only = True

    cfg = model_config(args)
    dtype = q.config.as_dtype(args.dtype)
    opts = q.ModelOptions(param_dtype=dtype, dtype=dtype, attention=args.attention)
    shapes = [grid(args.img_tokens)] + ([grid(args.ref_tokens)] if args.ref_tokens else [])
    inp = make_inputs(cfg, args)
    if args.jax_only:
        model = q.init_transformer(cfg, opts, seed=0)
    else:
        import torch

        from tests.torch_reference import make_torch_model, save_torch_model

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        tm = make_torch_model(cfg, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            model = q.load_transformer(save_torch_model(tm, tmp), options=opts)
    runners = {"jax (batched cfg)": jax_runner(model, inp, shapes, args, True),
               "jax (separate cfg)": jax_runner(model, inp, shapes, args, False)}
    if not args.jax_only:
        runners["diffusers (torch)"] = torch_runner(tm, inp, shapes, args)
    stats, outs = measure(runners, args.iters)
    # matmul FLOPs per step: cond + uncond forwards (the negative prompt counted at the positive's length)
    step_flops = 2 * model_flops(cfg, args.batch, args.img_tokens + args.ref_tokens, args.txt_tokens)
    rows = []
    for name, st in stats.items():
        row = {"impl": name, "s_per_step": st["loop_s"] / args.steps, "loop_s": st["loop_s"],
               "compile_s": max(st["first_call_s"] - st["loop_s"], 0.0) if name.startswith("jax") else None,
               "clean_rounds": f"{st['clean_rounds']}/{args.iters}",
               "tflops_s": step_flops / (st["loop_s"] / args.steps) / 1e12}
        if not args.jax_only and name.startswith("jax"):
            ref = outs["diffusers (torch)"].float().numpy()
            o = np.asarray(outs[name], np.float32)
            row["rel_err_vs_diffusers"] = float(np.max(np.abs(o - ref)) / np.max(np.abs(ref)))
        rows.append(row)
    result = {
        "device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform, "host": platform.node(),
        "dtype": str(dtype), "batch": args.batch, "steps": args.steps, "layers": cfg.num_layers,
        "inner_dim": cfg.inner_dim, "params": q.count_params(model), "img_tokens": args.img_tokens,
        "ref_tokens": args.ref_tokens, "txt_tokens": args.txt_tokens, "attention": args.attention,
        "torch_threads": None, "step_flops": step_flops, "results": rows,
    }
    if not args.jax_only:
        result["torch_threads"] = torch.get_num_threads()
        tt = stats["diffusers (torch)"]["times"]
        for key, name in (("batched", "jax (batched cfg)"), ("separate", "jax (separate cfg)")):
            result[f"diffusers_over_jax_{key}"] = statistics.median(
                [a / b for a, b in zip(tt, stats[name]["times"])])
    print(f"device {result['device']}, {dtype}, {cfg.num_layers} layers, inner dim {cfg.inner_dim}, "
          f"{result['params'] / 1e6:.1f}M params, tokens: {args.img_tokens} target + {args.ref_tokens} reference "
          f"+ {args.txt_tokens} text, batch {args.batch}, true CFG, {args.steps} steps")
    print_table(rows, ["impl", "s_per_step", "loop_s", "compile_s", "tflops_s", "clean_rounds",
                       "rel_err_vs_diffusers"])
    if not args.jax_only:
        print(f"diffusers / JAX time per step (median of per-round ratios): "
              f"{result['diffusers_over_jax_batched']:.2f}x (batched cfg), "
              f"{result['diffusers_over_jax_separate']:.2f}x (separate cfg)")
    if args.json:
        emit_json(result)
    return result


if __name__ == "__main__":
    main()
