"""Plan the sharded LoRA training step on a real TPU target without a TPU: per-chip memory and FLOPs.

A command line over `qwen_edit_jax.training.plan` (which `train/train_lora.py --plan` also uses): builds
the real model abstractly (no weights), AOT-compiles the real training step for a TPU *topology* (libtpu
compiles for it on this CPU machine) and reports XLA's own memory and cost analysis for one chip:

    python benchmarks/memory_plan.py --preset qwen-image-edit --topology v5e:2x4 \
        --height 1024 --width 1024 --lora-rank 32 --batch 8 --json

Needs `pip install -e .[tpu-plan]` (libtpu). The last line with `--json` is one JSON object.
Peak = arguments + outputs − donated aliases + temporaries (+ code), as XLA allocates them.
When the TPU compiler refuses the program (HBM OOM), the figure in its error is not the real need
(it reports what an un-rematerialised schedule would take); the plan then compiles the same step
with shorter stacks (`--extrapolate 4,8` blocks), fits temporaries = a + b·blocks, and reports the
full-depth arguments + extrapolated temporaries, marked `peak_source: "extrapolated"`.
FLOPs are counted on the step's jaxpr (every matmul, × scan length, remat recomputation
included, splash kernels by FlashAttention accounting), because XLA's cost analysis counts the
60-layer scan's loop body once. Estimated step time = flops_per_device / chip peak bf16 FLOP/s:
a lower bound at 100% MFU (real runs reach 30–60%); `--mfu` scales it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other local jax processes may hold the libtpu lock
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen_edit_jax.training.plan import format_plan  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen-image-edit")
    p.add_argument("--topology", default="v5e:2x4", help="libtpu topology, e.g. v5e:2x4, v5p:2x2x1, v6e:2x4")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--refs", type=int, default=1, help="reference images (same size as the target)")
    p.add_argument("--text-len", type=int, default=256, help="prompt tokens (padded bucket)")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
    p.add_argument("--remat", default="full", choices=["none", "full", "save_matmuls"])
    p.add_argument("--attention", default="splash", choices=["xla", "chunked", "splash"])
    p.add_argument("--param-dtype", default="bfloat16")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "fp8", "int4"],
                   help="weight-only quantized frozen base (block kernels int8 / fp8 + per-channel scales, "
                        "int4 + per-group scales)")
    p.add_argument("--offload", default="none", choices=["none", "base"],
                   help="base: the blocks' frozen weights in host memory, fetched one layer at a time")
    p.add_argument("--layers", type=int, default=None, help="cut the stack to this many blocks (planning aid)")
    p.add_argument("--extrapolate", default="4,8",
                   help="when the compiler refuses the full stack: compile these shorter stacks and extrapolate "
                        "their temporaries linearly to the full depth ('' = report the error's lower bound)")
    p.add_argument("--host-gbps", type=float, default=25.0,
                   help="host→device GB/s for the offload transfer time (25: PCIe Gen4 x16 in practice)")
    p.add_argument("--mfu", type=float, default=1.0, help="assumed model-FLOPs utilisation for the time estimate")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def plan(args) -> dict:
    import qwen_edit_jax as q
    from qwen_edit_jax import parallel
    from qwen_edit_jax.config import LoraConfig, ModelOptions
    from qwen_edit_jax.training.plan import Workload, plan_step, tpu_target

    cfg = q.preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    target = tpu_target(args.topology)
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = parallel.make_mesh(data, fsdp, tensor, devices=target.devices)
    opts = ModelOptions(param_dtype=args.param_dtype, dtype=args.dtype, remat=args.remat, attention=args.attention,
                        lora=LoraConfig(rank=args.lora_rank),
                        quantize=None if args.quantize == "none" else args.quantize, offload=args.offload)
    workload = Workload.from_pixels(cfg, args.height, args.width, args.refs, text_len=args.text_len,
                                    batch=args.batch, grad_accum=args.grad_accum)
    extrapolate = [int(x) for x in args.extrapolate.split(",") if x.strip()]
    return {"preset": args.preset, **plan_step(cfg, opts, target, mesh, workload, extrapolate=extrapolate,
                                               mfu=args.mfu, host_gbps=args.host_gbps)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = plan(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
