"""Time the DiT forward and forward+backward (merged vs separate QKV), against a matmul peak.

    python benchmarks/train_step.py --preset tiny
    python benchmarks/train_step.py --layers 2 --heads 24 --head-dim 128 --txt-dim 3584 \
        --img-tokens 4096 --ref-tokens 4096 --txt-tokens 256 --dtype bf16 --compare-qkv --json

Achieved FLOP/s counts the model's matmul FLOPs analytically (linears + attention; backward =
2 × forward) and is set against the peak of one large matmul measured in the same run.
`--lora-rank R` times a full LoRA training step against diffusers + PEFT; that side needs the test
extra (torch, diffusers, peft): without it, or with `--jax-only`, only the JAX step is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen_edit_jax.utils.accelerators import cpu_unless_accelerator  # noqa: E402

cpu_unless_accelerator()  # no libtpu probe noise on a CPU-only machine (JAX_PLATFORMS wins if set)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import qwen_edit_jax as q  # noqa: E402
from _timing import emit_json, print_table, reference_missing, time_fn  # noqa: E402


def grid(n: int) -> tuple[int, int, int]:
    """A (1, h, w) token grid with h·w = n, as square as possible."""
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return (1, h, n // h)


def model_flops(cfg: q.DiTConfig, batch: int, n_img: int, n_txt: int) -> float:
    """Forward matmul FLOPs (2·m·n·k per matmul) of the whole model."""
    d = cfg.inner_dim
    per_tok = 2 * d * (3 * d + d + 8 * d)  # qkv, out, mlp (fc1 + fc2)
    s = n_img + n_txt
    attn = 4 * cfg.num_attention_heads * s * s * cfg.attention_head_dim
    block = batch * ((n_img + n_txt) * per_tok + attn) + batch * 2 * 2 * d * 6 * d
    io = batch * 2 * (n_img * cfg.in_channels * d + n_txt * cfg.joint_attention_dim * d + n_img * d * cfg.out_features)
    return cfg.num_layers * block + io


def matmul_peak(dtype: jnp.dtype, n: int) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(dtype))
    t = time_fn(lambda: f(a, a).block_until_ready(), iters=7, warmup=2)["median_s"]
    return 2 * n**3 / t


def add_model_args(p: argparse.ArgumentParser, default_layers: int) -> None:
    """The architecture flags shared by the benchmarks (read back by `model_config`)."""
    p.add_argument("--preset", default=None, help="start from a preset (e.g. tiny); other model flags ignored")
    p.add_argument("--layers", type=int, default=0, help=f"number of blocks (default {default_layers}, or the preset's)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--txt-dim", type=int, default=512)
    p.set_defaults(default_layers=default_layers)


def model_config(args: argparse.Namespace) -> q.DiTConfig:
    """The benchmarked architecture: a preset (optionally fewer layers) or the width flags."""
    if args.preset:
        cfg = q.preset(args.preset)
        return dataclasses.replace(cfg, num_layers=args.layers) if args.layers else cfg
    return q.DiTConfig(num_layers=args.layers or args.default_layers, num_attention_heads=args.heads,
                       attention_head_dim=args.head_dim, joint_attention_dim=args.txt_dim,
                       axes_dims_rope=rope_axes(args.head_dim))


def build(args: argparse.Namespace, fuse_qkv: bool):
    cfg = model_config(args)
    dtype = q.config.as_dtype(args.dtype)
    opts = q.ModelOptions(param_dtype=dtype, dtype=dtype, fuse_qkv=fuse_qkv, remat=args.remat,
                          attention=args.attention)
    return cfg, q.init_transformer(cfg, opts, seed=0)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split head_dim like the real (16, 56, 56): 1/8 frame, the rest to h and w (all even)."""
    f = max(2, (head_dim // 8) // 2 * 2)
    hw = (head_dim - f) // 2 // 2 * 2
    return (head_dim - 2 * hw, hw, hw)


def bench_model(args: argparse.Namespace, fuse_qkv: bool) -> dict:
    cfg, model = build(args, fuse_qkv)
    dtype = model.options.dtype
    shapes = [grid(args.img_tokens)] + ([grid(args.ref_tokens)] if args.ref_tokens else [])
    n = args.img_tokens + args.ref_tokens
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, n, cfg.in_channels)), dtype)
    e = jnp.asarray(rng.standard_normal((args.batch, args.txt_tokens, cfg.joint_attention_dim)), dtype)
    t = jnp.full((args.batch,), 0.5, jnp.float32)
    graphdef, state = nnx.split(model)

    def fwd(state, x, e, t):
        return nnx.merge(graphdef, state)(hidden_states=x, encoder_hidden_states=e, timestep=t,
                                          img_shapes=[shapes] * args.batch)

    def loss(state, x, e, t):
        out = fwd(state, x, e, t)[:, : args.img_tokens].astype(jnp.float32)
        return jnp.mean(out**2)

    fwd_j = jax.jit(fwd)
    grad_j = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    fwd_c = fwd_j.lower(state, x, e, t).compile()
    compile_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    grad_c = grad_j.lower(state, x, e, t).compile()
    compile_grad = time.perf_counter() - t0
    f = time_fn(lambda: fwd_c(state, x, e, t).block_until_ready(), iters=args.iters, warmup=args.warmup)
    g = time_fn(lambda: jax.block_until_ready(grad_c(state, x, e, t)), iters=args.iters, warmup=args.warmup)
    flops = model_flops(cfg, args.batch, n, args.txt_tokens)
    return {
        "qkv": "merged" if fuse_qkv else "separate",
        "params": q.count_params(model),
        "fwd_s": f["median_s"], "fwd_bwd_s": g["median_s"],
        "fwd_clean": f["clean"], "fwd_bwd_clean": g["clean"],
        "fwd_flops": flops, "fwd_tflops_s": flops / f["median_s"] / 1e12,
        "fwd_bwd_tflops_s": 3 * flops / g["median_s"] / 1e12,
        "compile_fwd_s": compile_fwd, "compile_fwd_bwd_s": compile_grad,
    }


def bench_lora(args: argparse.Namespace) -> dict:
    """A full LoRA training step (`qwen_edit_jax.training.make_train_step`: forward, backward, clip,
    AdamW, donated buffers) against diffusers + PEFT doing the same step in PyTorch (same config,
    same targets as separate q/k/v LoRAs, fp32 on CPU), in one run. Prints the time ratio.
    Without torch/diffusers/peft (the test extra), or with `--jax-only`, times the JAX step alone."""
    from qwen_edit_jax.training.config import ObjectiveSection, OptimSection
    from qwen_edit_jax.training.step import make_optimizer, make_train_step, split_lora

    cfg = model_config(args)
    rank, b = args.lora_rank, args.batch
    lora = q.LoraConfig(rank=rank, alpha=rank)  # default targets: to_qkv, add_qkv_proj, to_out, to_add_out, MLPs
    opts = q.ModelOptions(param_dtype="float32", dtype="float32", remat=args.remat, attention=args.attention, lora=lora)
    shapes = tuple([grid(args.img_tokens)] + ([grid(args.ref_tokens)] if args.ref_tokens else []))
    rng = np.random.default_rng(0)
    c = cfg.in_channels
    arrays = {
        "target": rng.standard_normal((1, b, args.img_tokens, c)).astype(np.float32),
        "references": rng.standard_normal((1, b, args.ref_tokens, c)).astype(np.float32),
        "prompt_embeds": rng.standard_normal((1, b, args.txt_tokens, cfg.joint_attention_dim)).astype(np.float32),
        "prompt_mask": np.ones((1, b, args.txt_tokens), bool),
    }

    # ---- ours
    model = q.init_transformer(cfg, opts, seed=0)
    graphdef, params, base = split_lora(model)
    n_lora = int(sum(x.size for x in jax.tree.leaves(params)))
    tx, _ = make_optimizer(OptimSection(learning_rate=1e-4, max_grad_norm=1.0), 1000)
    step = make_train_step(graphdef, tx, ObjectiveSection(timestep_sampling="uniform"))
    state = {"p": params, "o": tx.init(params), "i": 0}
    dev = {k: jnp.asarray(v) for k, v in arrays.items()}
    key = jax.random.key(0)

    def ours():
        state["p"], state["o"], m = step(state["p"], state["o"], base, shapes, dev, key, state["i"])
        state["i"] += 1
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - t0
    if args.jax_only or reference_missing("torch", "diffusers", "peft"):
        jt = time_fn(ours, iters=args.iters, warmup=args.warmup)
        rows = [{"impl": "jax (merged qkv, split LoRA)", "step_s": jt["median_s"], "clean": jt["clean"],
                 "lora_params": n_lora, "compile_s": compile_s}]
        result = {
            "device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
            "host": platform.node(), "dtype": "float32", "batch": b, "lora_rank": rank, "layers": cfg.num_layers,
            "inner_dim": cfg.inner_dim, "img_tokens": args.img_tokens, "ref_tokens": args.ref_tokens,
            "txt_tokens": args.txt_tokens, "step_s": jt["median_s"], "torch_step_s": None, "torch_over_jax": None,
            "results": rows,
        }
        print(f"LoRA training step (JAX only), rank {rank}, {cfg.num_layers} layers x dim {cfg.inner_dim}, fp32, "
              f"batch {b}")
        print_table(rows, ["impl", "step_s", "clean", "lora_params", "compile_s"])
        if args.json:
            emit_json(result)
        return result

    # ---- diffusers + PEFT
    import torch
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig as PeftLoraConfig

    torch.manual_seed(0)
    d = cfg.to_dict()
    d.pop("_class_name")
    tm = QwenImageTransformer2DModel(**d).float().train()
    tm.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    tm.add_adapter(PeftLoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True))
    trainable = [p for p in tm.parameters() if p.requires_grad]
    n_torch = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    x0 = torch.from_numpy(arrays["target"][0])
    refs = torch.from_numpy(arrays["references"][0])
    enc = torch.from_numpy(arrays["prompt_embeds"][0])
    mask = torch.from_numpy(arrays["prompt_mask"][0])
    img_shapes = [list(shapes)] * b

    def theirs():
        noise = torch.randn_like(x0)
        sigma = torch.rand(b)
        s = sigma[:, None, None]
        hidden = torch.cat([(1 - s) * x0 + s * noise, refs], dim=1)
        pred = tm(hidden_states=hidden, encoder_hidden_states=enc, encoder_hidden_states_mask=mask, timestep=sigma,
                  img_shapes=img_shapes, return_dict=False)[0][:, : args.img_tokens]
        loss = torch.mean((pred.float() - (noise - x0)) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Interleaved, one step each in turn, so that load from other processes hits both sides alike;
    # the ratio is the median of the per-pair ratios.
    for _ in range(args.warmup):
        ours()
        theirs()
    jts, tts = [], []
    for _ in range(args.iters):
        jts.append(time_fn(ours, iters=1, warmup=0, min_clean=1))
        tts.append(time_fn(theirs, iters=1, warmup=0, min_clean=1))
    jt = {"median_s": float(np.median([r["median_s"] for r in jts])), "clean": all(r["clean"] for r in jts)}
    tt = {"median_s": float(np.median([r["median_s"] for r in tts])), "clean": all(r["clean"] for r in tts)}
    pair_ratio = float(np.median([t["median_s"] / j["median_s"] for j, t in zip(jts, tts)]))
    jt["best_s"] = min(r["median_s"] for r in jts)  # on a shared machine the fastest step is the least disturbed
    tt["best_s"] = min(r["median_s"] for r in tts)
    rows = [
        {"impl": "jax (merged qkv, split LoRA)", "step_s": jt["median_s"], "best_s": jt["best_s"],
         "clean": jt["clean"], "lora_params": n_lora, "compile_s": compile_s},
        {"impl": f"torch {torch.__version__} diffusers+peft", "step_s": tt["median_s"], "best_s": tt["best_s"],
         "clean": tt["clean"], "lora_params": n_torch, "threads": torch.get_num_threads()},
    ]
    result = {
        "device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform, "host": platform.node(),
        "dtype": "float32", "batch": b, "lora_rank": rank, "layers": cfg.num_layers, "inner_dim": cfg.inner_dim,
        "img_tokens": args.img_tokens, "ref_tokens": args.ref_tokens, "txt_tokens": args.txt_tokens,
        "step_s": jt["median_s"], "torch_step_s": tt["median_s"], "torch_over_jax": pair_ratio,
        "torch_over_jax_best": tt["best_s"] / jt["best_s"],
        "results": rows,
    }
    print(f"LoRA training step, rank {rank}, {cfg.num_layers} layers x dim {cfg.inner_dim}, fp32, batch {b}, tokens: "
          f"{args.img_tokens} target + {args.ref_tokens} reference + {args.txt_tokens} text")
    print_table(rows, ["impl", "step_s", "best_s", "clean", "lora_params", "compile_s", "threads"])
    print(f"torch / jax step time: {result['torch_over_jax']:.2f}x (median of {args.iters} interleaved pairs), "
          f"{result['torch_over_jax_best']:.2f}x (best step of each)")
    if args.json:
        emit_json(result)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_layers=2)
    p.add_argument("--img-tokens", type=int, default=1024, help="target-image tokens")
    p.add_argument("--ref-tokens", type=int, default=1024, help="reference-image tokens (0: text-to-image)")
    p.add_argument("--txt-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="none", choices=["none", "full", "save_matmuls"])
    p.add_argument("--attention", default="auto", help="attention kernel (default: the library default, auto)")
    p.add_argument("--separate-qkv", action="store_true", help="run the six-projection layout instead of merged")
    p.add_argument("--compare-qkv", action="store_true", help="run merged and separate in the same process")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="time a full LoRA training step of this rank vs diffusers+PEFT in PyTorch (bench_lora)")
    p.add_argument("--jax-only", action="store_true",
                   help="with --lora-rank: time the JAX step alone (automatic without the test extra)")
    args = p.parse_args(argv)
    if args.preset:
        args.img_tokens, args.ref_tokens, args.txt_tokens = (args.img_tokens if args.img_tokens != 1024 else 64,
                                                            args.ref_tokens if args.ref_tokens != 1024 else 64,
                                                            args.txt_tokens if args.txt_tokens != 128 else 16)
    if args.lora_rank:
        return bench_lora(args)
    dtype = q.config.as_dtype(args.dtype)
    peak = matmul_peak(dtype, 2048 if jax.devices()[0].platform == "cpu" else 8192)
    layouts = [True, False] if args.compare_qkv else [not args.separate_qkv]
    rows = [bench_model(args, fuse) for fuse in layouts]
    for r in rows:
        r["fwd_mfu"] = r["fwd_tflops_s"] * 1e12 / peak
        r["fwd_bwd_mfu"] = r["fwd_bwd_tflops_s"] * 1e12 / peak
    result = {
        "device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
        "host": platform.node(), "dtype": str(dtype), "batch": args.batch,
        "img_tokens": args.img_tokens, "ref_tokens": args.ref_tokens, "txt_tokens": args.txt_tokens,
        "matmul_peak_tflops_s": peak / 1e12, "results": rows,
    }
    if args.compare_qkv:
        result["merged_over_separate_fwd"] = rows[0]["fwd_s"] / rows[1]["fwd_s"]
        result["merged_over_separate_fwd_bwd"] = rows[0]["fwd_bwd_s"] / rows[1]["fwd_bwd_s"]
    print(f"device {result['device']}, {dtype}, matmul peak {peak / 1e12:.3g} TFLOP/s, "
          f"tokens: {args.img_tokens} target + {args.ref_tokens} reference + {args.txt_tokens} text, batch {args.batch}")
    print_table(rows, ["qkv", "params", "fwd_s", "fwd_bwd_s", "fwd_tflops_s", "fwd_bwd_tflops_s", "fwd_bwd_mfu",
                       "compile_fwd_bwd_s"])
    if args.compare_qkv:
        print(f"merged / separate time: fwd {result['merged_over_separate_fwd']:.3f}, "
              f"fwd+bwd {result['merged_over_separate_fwd_bwd']:.3f}")
    if args.json:
        emit_json(result)
    return result


if __name__ == "__main__":
    main()
