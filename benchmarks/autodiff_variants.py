"""The LoRA training step with and without the written-out backward passes, per platform.

`ModelOptions.custom_grads` picks which of two hand-written derivatives replace autodiff: "lora"
(`lora_delta`'s custom VJP, whose weight gradients transpose the narrow factor behind an optimization
barrier) and "gelu" (tanh-GELU's derivative, which keeps only its input). For each combination this
AOT-compiles the real training step (`training.plan.build_step`, full width 3072, bf16) for TPU topologies
(libtpu compiles for them on a CPU host) and reports XLA's cost analysis (FLOPs, bytes accessed), the peak
memory (arguments + outputs − aliases + temporaries + code) and the number of `copy` and `transpose`
instructions in the optimized HLO (standalone and inside fusions). Then the same figures for the step on
the local CPU at width 512 (fp32), and its step time, the variants interleaved run by run:

    python benchmarks/autodiff_variants.py --layers 2 --json

XLA's cost analysis counts the layer scan's body once: the figures are per scan body plus what lies
outside it, comparable across variants, not whole-model totals. The last line with `--json` is one JSON
object. Needs libtpu for the TPU targets (`pip install -e .[tpu-plan]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other local jax processes may hold the libtpu lock
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import qwen_edit_jax as q  # noqa: E402
from _timing import emit_json, print_table  # noqa: E402
from qwen_edit_jax import parallel  # noqa: E402
from qwen_edit_jax.config import LoraConfig, ModelOptions  # noqa: E402
from qwen_edit_jax.training.plan import Workload, build_step, tpu_target  # noqa: E402

VARIANTS = {"plain": (), "lora": ("lora",), "gelu": ("gelu",), "both": ("gelu", "lora")}
_OP = re.compile(r"\s(copy|copy-start|transpose)\(")


def hlo_op_counts(text: str) -> dict[str, int]:
    """`copy` (with async `copy-start`) and `transpose` instructions in optimized HLO text, standalone and
    inside fused computations."""
    counts = {"copy": 0, "transpose": 0, "fused_copy": 0, "fused_transpose": 0}
    fused = False
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation's header
            fused = "fused" in line.split("(")[0] or "fusion" in line.split("(")[0]
            continue
        m = _OP.search(line)
        if m and "=" in line[: m.start()]:
            op = "copy" if m.group(1).startswith("copy") else "transpose"
            counts[("fused_" if fused else "") + op] += 1
    return counts


def compile_stats(lowered) -> dict:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "peak_bytes": int(peak), "temp_bytes": int(mem.temp_size_in_bytes),
            **hlo_op_counts(compiled.as_text()), "compile_s": time.perf_counter() - t0}


def aot_rows(args, target: str) -> list[dict]:
    """Compile the full-width bf16 step for the TPU topology `target` in each variant."""
    cfg = dataclasses.replace(q.preset("qwen-image-edit"), num_layers=args.layers)
    mesh = parallel.make_mesh(1, 1, 1, devices=tpu_target(target).devices[:1])
    workload = Workload.square(cfg, args.size, 1, text_len=args.text_len)
    rows = []
    for name in args.variants:
        grads = VARIANTS[name]
        opts = ModelOptions(param_dtype="bfloat16", dtype="bfloat16", remat=args.remat,
                            lora=LoraConfig(rank=args.rank), custom_grads=grads)
        stats = compile_stats(build_step(cfg, opts, mesh, workload).lower())
        print(f"  {target} {name}: {stats}", file=sys.stderr, flush=True)
        rows.append({"target": target, "variant": name, **stats})
    return rows


def cpu_rows(args) -> tuple[list[dict], dict]:
    """The step on the local CPU at width 512 (fp32: XLA:CPU cannot train bf16 activations): each variant's
    compile statistics, and the median and spread of its step time over `--runs` interleaved rounds."""
    from qwen_edit_jax.training.config import ObjectiveSection, OptimSection
    from qwen_edit_jax.training.step import make_optimizer, make_train_step, split_lora

    cfg = q.DiTConfig(num_layers=args.time_layers, num_attention_heads=8, attention_head_dim=64,
                      joint_attention_dim=512, axes_dims_rope=(8, 28, 28))
    side = int(np.sqrt(args.time_tokens))
    shapes = [(1, side, side), (1, side, side)]
    n = side * side
    rng = np.random.default_rng(0)
    arrays = {"target": jnp.asarray(rng.standard_normal((1, 1, n, cfg.in_channels)), jnp.float32),
              "references": jnp.asarray(rng.standard_normal((1, 1, n, cfg.in_channels)), jnp.float32),
              "prompt_embeds": jnp.asarray(rng.standard_normal((1, 1, 128, 512)), jnp.float32),
              "prompt_mask": jnp.ones((1, 1, 128), bool)}
    tx, _ = make_optimizer(OptimSection(), 1000)
    steps, rows = {}, []
    for name in args.variants:
        grads = VARIANTS[name]
        opts = ModelOptions(remat=args.remat, lora=LoraConfig(rank=args.rank), custom_grads=grads)
        graphdef, params, base = split_lora(q.init_transformer(cfg, opts, seed=0))
        step = make_train_step(graphdef, tx, ObjectiveSection(), donate=False)
        opt_state = tx.init(params)
        stats = compile_stats(step.lower(params, opt_state, base, shapes, arrays, jax.random.key(0), 0))
        print(f"  cpu {name}: {stats}", file=sys.stderr, flush=True)
        rows.append({"target": "cpu", "variant": name, **stats})

        def run(step=step, params=params, opt_state=opt_state, base=base):
            jax.block_until_ready(step(params, opt_state, base, shapes, arrays, jax.random.key(0), 0))

        run(), run()  # compile, warm up
        steps[name] = run
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.runs):
        for name, run in steps.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return rows, {"config": f"{args.time_layers} blocks x 512 (8 heads x 64), rank {args.rank}, fp32, "
                            f"remat {args.remat}, {n} + {n} image + 128 text tokens",
                  "runs": {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "all_s": v}
                           for k, v in times.items()}}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help="blocks of the full-width (3072, 24 heads) model")
    p.add_argument("--size", type=int, default=1024, help="target and reference side in pixels (1024: 4096 tokens each)")
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--remat", default="full", choices=["none", "full", "save_matmuls"])
    p.add_argument("--targets", default="v5e:1x1,v6e:1x1", help="TPU topologies ('' = none)")
    p.add_argument("--time-layers", type=int, default=2, help="blocks of the width-512 model run on the CPU")
    p.add_argument("--time-tokens", type=int, default=1024, help="target (= reference) tokens of the CPU step")
    p.add_argument("--runs", type=int, default=3, help="interleaved timed rounds on the CPU (0: no CPU part)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="which of plain (autodiff), lora (its VJP), gelu (its derivative), both")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not set(args.variants) <= set(VARIANTS):
        p.error(f"--variants: choose from {list(VARIANTS)}")

    rows = [r for t in args.targets.split(",") if t.strip() for r in aot_rows(args, t.strip())]
    timing = None
    if args.runs:
        cpu, timing = cpu_rows(args)
        rows += cpu
    print_table(rows, ["target", "variant", "flops", "bytes_accessed", "peak_bytes", "temp_bytes", "copy",
                       "transpose", "fused_copy", "fused_transpose", "compile_s"])
    if timing:
        print(timing["config"])
        print_table([{"variant": k, **{m: v[m] for m in ("median_s", "min_s", "max_s")}}
                     for k, v in timing["runs"].items()], ["variant", "median_s", "min_s", "max_s"])
    if args.json:
        emit_json({"layers": args.layers, "size": args.size, "text_len": args.text_len, "rank": args.rank,
                   "remat": args.remat, "jax": jax.__version__, "libtpu": _version("libtpu"), "aot": rows,
                   "cpu_timing": timing})
    return 0


if __name__ == "__main__":
    sys.exit(main())
