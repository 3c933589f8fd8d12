"""Plan the sharded LoRA training step on a real TPU target without a TPU: per-chip memory and FLOPs.

Builds the real model abstractly (no weights), places every parameter, LoRA adapter, Adam moment
and batch array on a mesh over a TPU *topology* (libtpu compiles for it on this CPU machine),
AOT-compiles the real training step (`qwen_edit_jax.training.step.make_train_step`) and reports
XLA's own memory and cost analysis for one chip:

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
import time

import numpy as np

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other local jax processes may hold the libtpu lock
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 2**30

# Peak dense bf16 compute and HBM per chip, from Google Cloud's TPU system-architecture pages
# (cloud.google.com/tpu/docs/v5e, /v5p, /v6e). `budget_gib` leaves room for the runtime.
CHIPS = {
    "v5e": dict(peak_tflops=197.0, hbm_gib=16.0, budget_gib=15.0),
    "v5p": dict(peak_tflops=459.0, hbm_gib=95.0, budget_gib=90.0),
    "v6e": dict(peak_tflops=918.0, hbm_gib=32.0, budget_gib=30.0),
    "v4": dict(peak_tflops=275.0, hbm_gib=32.0, budget_gib=30.0),
}


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


def chip_of(topology: str) -> dict:
    gen = topology.split(":")[0].lower()
    if gen not in CHIPS:
        raise SystemExit(f"error: unknown TPU generation {gen!r} in --topology {topology}; known: {sorted(CHIPS)}")
    return CHIPS[gen]


def topology_devices(name: str):
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as e:  # no libtpu, bad name
        raise SystemExit(f"error: cannot describe TPU topology {name!r} ({e}); install the tpu-plan extra "
                         f"(pip install -e .[tpu-plan]) and use names like v5e:2x4, v5p:2x2x1, v6e:2x4") from None


def build_step(cfg, opts, mesh, args):
    """(lowered-able step, abstract arguments) of the real LoRA training step for `cfg` on `mesh`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import qwen_edit_jax as q
    from qwen_edit_jax import sharding as shd
    from qwen_edit_jax.models.offload import HOST, is_offloaded
    from qwen_edit_jax.training.config import ObjectiveSection, OptimSection
    from qwen_edit_jax.training.step import make_optimizer, make_train_step

    graphdef, lora_abs, base_abs = nnx.split(q.abstract_model(cfg, opts), nnx.LoRAParam, ...)

    def placed(state, offload=False):
        sh = nnx.to_pure_dict(shd.param_shardings(state, mesh))
        if offload:  # the blocks' frozen leaves in host memory (models/offload.py)
            sh = jax.tree_util.tree_map_with_path(
                lambda p, s: s.with_memory_kind(HOST)
                if is_offloaded(jax.tree_util.keystr(p, simple=True, separator=".")) else s, sh)
        vals = nnx.to_pure_dict(state)
        return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), vals, sh)

    params, base = placed(lora_abs), placed(base_abs, opts.offload == "base")
    tx, _ = make_optimizer(OptimSection(), max_steps=1000)
    opt_abs = jax.eval_shape(tx.init, params)
    opt_sh = shd.like_params(opt_abs, params, jax.tree.map(lambda x: x.sharding, params), mesh)
    opt_state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), opt_abs, opt_sh)

    h, w = token_grid(cfg, args)
    n_target = h * w
    img_shapes = [(1, h, w)] * (1 + args.refs)
    a, b, c = args.grad_accum, args.batch, cfg.in_channels
    arrays = {
        "target": jax.ShapeDtypeStruct((a, b, n_target, c), jnp.float32),
        "references": jax.ShapeDtypeStruct((a, b, n_target * args.refs, c), jnp.float32),
        "prompt_embeds": jax.ShapeDtypeStruct((a, b, args.text_len, cfg.joint_attention_dim), jnp.bfloat16),
        "prompt_mask": jax.ShapeDtypeStruct((a, b, args.text_len), jnp.bool_),
    }
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step_no = jax.ShapeDtypeStruct((), jnp.int32)
    step = make_train_step(graphdef, tx, ObjectiveSection(), mesh=mesh)

    def jaxpr():
        """The step's jaxpr (traced under the mesh, as jit does) for FLOP counting."""
        fn = step._step_fn(tuple(img_shapes)).fn  # the un-jitted step function
        with jax.set_mesh(mesh):
            return jax.make_jaxpr(fn)(params, opt_state, base, arrays, rng, step_no).jaxpr

    accum = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *shd.batch_sharding(mesh, b).spec))
    arg_bytes = sum(_shard_bytes(x) for t in (params, opt_state, base) for x in jax.tree.leaves(t)
                    if x.sharding.memory_kind != HOST)
    arg_bytes += sum(_shard_bytes(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=accum)) for x in arrays.values())
    return (lambda: step.lower(params, opt_state, base, img_shapes, arrays, rng, step_no)), jaxpr, base, arg_bytes


def _shard_bytes(x) -> int:
    """Bytes of one device's shard of an abstract array."""
    import jax

    shape = x.shape if x.sharding is None else x.sharding.shard_shape(x.shape)
    return int(np.prod(shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8  # int4: half a byte


def _hbm_oom(err: Exception) -> int | None:
    """Bytes of HLO temporaries from XLA's compile-time HBM OOM message (None: another error)."""
    import re

    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(err))
    if "RESOURCE_EXHAUSTED" not in str(err) or m is None:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def _compile(lowered, arg_bytes: int):
    """(sizes, peak bytes, XLA flops, OOM temporaries or None) of one AOT compile."""
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs that cannot fit in HBM
        oom = _hbm_oom(e)
        if oom is None:
            raise
        # lower bound: the arguments plus the temporaries XLA reported needing
        return dict(argument=arg_bytes, output=0, alias=0, temp=oom, host=0, host_temp=0), arg_bytes + oom, 0.0, oom
    mem = compiled.memory_analysis()
    sizes = dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
                 alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
                 host=mem.host_argument_size_in_bytes, host_temp=mem.host_temp_size_in_bytes)
    peak = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    return sizes, peak, float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0.0)), None


def token_grid(cfg, args) -> tuple[int, int]:
    """Packed-token grid (h, w) of one image: VAE /8, then patch_size² patches."""
    f = 8 * cfg.patch_size
    if args.height % f or args.width % f:
        raise ValueError(f"--height/--width must be multiples of {f}, got {args.height}×{args.width}")
    return args.height // f, args.width // f


SPLASH_BWD_MATMULS = {"fwd": 2, "dkv": 5, "dq": 3}  # S×S×d matmuls per splash kernel phase (fused bwd: dkv)


def _sub_jaxprs(params: dict):
    from jax.extend import core as jcore

    for v in params.values():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def _splash_flops(eqn) -> float:
    """FLOPs of one splash `pallas_call` from its operand shapes (q, k, v are [..., H, S, d])."""
    phase = next((p for p in SPLASH_BWD_MATMULS if f"_{p}" in str(eqn.params.get("name", ""))), None)
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    # q, k, v (and do) are the highest-rank operands: [B, H, S, d], or [H, S, d] when vmap drops a batch
    # of 1 (one sample per chip); lower-rank ones ([B, S, 128] lane-broadcast residuals) can be larger
    # when H·d < 128 and must not be taken for q
    rank = max((len(sh) for sh in shapes), default=0)
    shapes = [sh for sh in shapes if len(sh) == rank >= 3]
    if phase is None or not shapes:
        return 0.0
    big = max(int(np.prod(sh)) for sh in shapes)
    qk = [sh for sh in shapes if int(np.prod(sh)) == big]  # q, k (, v, do): the largest operands, not mask tables
    q, k = qk[0], qk[1 if len(qk) > 1 else 0]
    return 2.0 * SPLASH_BWD_MATMULS[phase] * float(np.prod(q[:-1])) * k[-2] * q[-1]


def count_flops(jaxpr, mult: float = 1.0, out: dict | None = None) -> dict:
    """Matmul FLOPs of a step's jaxpr: {'global': outside shard_map (global shapes),
    'local': inside shard_map (one device's shapes), 'attention': splash kernels (local)}.

    Walks every sub-jaxpr: scan bodies × length, remat recomputation where autodiff placed it,
    splash kernels by phase (fwd 2, fused backward 5 S²d matmuls: FlashAttention accounting).
    XLA's own cost analysis counts a while-loop body once, so it cannot see the 60-layer scan.
    """
    out = out if out is not None else {"global": 0.0, "local": 0.0, "attention": 0.0, "_in_shard_map": False}
    where = "local" if out["_in_shard_map"] else "global"
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out[where] += mult * 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(np.prod([lhs[i] for i in lc]))
        elif name == "pallas_call":
            out["attention"] += mult * _splash_flops(eqn)
        elif name == "scan":
            count_flops(eqn.params["jaxpr"].jaxpr, mult * eqn.params["length"], out)
        elif name == "cond":
            branches = [count_flops(b.jaxpr, mult) for b in eqn.params["branches"]]
            best = max(branches, key=lambda d: d["global"] + d["local"] + d["attention"])
            for k in ("global", "local", "attention"):
                out[k] += best[k]
        elif name == "shard_map":
            inside, out["_in_shard_map"] = out["_in_shard_map"], True
            for sub in _sub_jaxprs(eqn.params):
                count_flops(sub, mult, out)
            out["_in_shard_map"] = inside
        else:
            for sub in _sub_jaxprs(eqn.params):
                count_flops(sub, mult, out)
    return out


def flops_per_device(step_jaxpr, cfg, mesh, args) -> dict:
    """Per-device FLOPs: global matmuls split over the devices that share the work (batch shards ×
    tensor), plus the per-device work inside shard_map (splash attention)."""
    from qwen_edit_jax import sharding as shd

    c = count_flops(step_jaxpr)
    shape = dict(mesh.shape)
    split = int(np.prod([shape[a] for a in shd.batch_axes_for(mesh, args.batch)])) * shape.get("tensor", 1)
    matmul = c["global"] / split + c["local"]
    return {"matmul": matmul, "attention": c["attention"], "total": matmul + c["attention"]}


def plan(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    import qwen_edit_jax as q
    from qwen_edit_jax import sharding as shd
    from qwen_edit_jax.config import LoraConfig, ModelOptions
    from qwen_edit_jax.models.offload import HOST

    cfg = q.preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    chip = chip_of(args.topology)
    devices = topology_devices(args.topology)
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = shd.make_mesh(data, fsdp, tensor, devices=devices)
    opts = ModelOptions(param_dtype=args.param_dtype, dtype=args.dtype, remat=args.remat, attention=args.attention,
                        lora=LoraConfig(rank=args.lora_rank),
                        quantize=None if args.quantize == "none" else args.quantize, offload=args.offload)
    model_abs = q.abstract_model(cfg, opts)
    n_params = q.count_params(model_abs)
    n_lora = q.count_params(model_abs, nnx.LoRAParam)

    lower, jaxpr, base, arg_bytes = build_step(cfg, opts, mesh, args)
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    sizes, peak, xla_reported, oom = _compile(lowered, arg_bytes)
    t2 = time.perf_counter()
    source, fitted = ("compiled" if oom is None else "oom_lower_bound"), {}
    short = sorted({int(x) for x in args.extrapolate.split(",") if x.strip()} - {cfg.num_layers})
    if oom is not None and len(short) >= 2 and max(short) < cfg.num_layers:
        for n in short:  # the same step on shorter stacks (all else equal): temporaries grow linearly
            lw, _, _, _ = build_step(dataclasses.replace(cfg, num_layers=n), opts, mesh, args)
            s_n, _, _, oom_n = _compile(lw(), 0)
            if oom_n is not None:
                break
            fitted[n] = s_n
        if len(fitted) == len(short):
            ns = np.array(list(fitted), float)
            temps = np.array([fitted[n]["temp"] for n in fitted], float)
            slope, icept = np.polyfit(ns, temps, 1)
            last = fitted[max(fitted)]
            sizes = dict(argument=arg_bytes, output=last["output"], alias=last["alias"],
                         temp=int(round(icept + slope * cfg.num_layers)), host=last["host"],
                         host_temp=last["host_temp"])
            peak = arg_bytes + sizes["output"] - sizes["alias"] + sizes["temp"]
            source = "extrapolated"
    flops = flops_per_device(jaxpr(), cfg, mesh, args)
    weights_per_dev = sum(_shard_bytes(x) for x in jax.tree.leaves(base))
    # offload: every block's frozen leaves cross the host link twice a step (forward, recomputing backward),
    # plus one repeated prefetch per direction (models/offload.py), for each micro-batch
    host_weights = sum(_shard_bytes(x) for x in jax.tree.leaves(base) if x.sharding.memory_kind == HOST)
    moved = host_weights * 2 * (cfg.num_layers + 1) // cfg.num_layers * args.grad_accum
    h, w = token_grid(cfg, args)
    return {
        "preset": args.preset,
        "topology": args.topology,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "height": args.height,
        "width": args.width,
        "refs": args.refs,
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "image_tokens": h * w * (1 + args.refs),
        "text_tokens": args.text_len,
        "remat": args.remat,
        "attention": args.attention,
        "lora_rank": args.lora_rank,
        "params": n_params,
        "lora_params": n_lora,
        "weights_bytes_per_device": weights_per_dev,
        "argument_bytes": sizes["argument"],
        "output_bytes": sizes["output"],
        "alias_bytes": sizes["alias"],
        "temp_bytes": sizes["temp"],
        "peak_bytes_per_device": int(peak),
        "peak_gib_per_device": peak / GiB,
        "num_layers": cfg.num_layers,
        "quantize": None if args.quantize == "none" else args.quantize,
        "offload": args.offload,
        "host_bytes_per_device": sizes["host"],  # offloaded weights in host memory (XLA's argument figure)
        "host_temp_bytes": sizes["host_temp"],  # host-memory temporaries XLA allocates
        "transfer_bytes_per_step": moved,
        "host_link_gbps": args.host_gbps,
        "transfer_s": moved / (args.host_gbps * 1e9),
        "compile_oom": oom is not None,  # XLA refused the full stack
        # "compiled": XLA's memory analysis; "extrapolated": full-depth arguments + temporaries fitted on the
        # shorter stacks in `extrapolated_from`; "oom_lower_bound": arguments + the error's temporaries
        "peak_source": source,
        "extrapolated_from": {str(n): v["temp"] for n, v in fitted.items()},
        "oom_reported_temp_bytes": oom,
        "hbm_gib": chip["hbm_gib"],
        "budget_gib": chip["budget_gib"],
        "fits": source != "oom_lower_bound" and peak / GiB <= chip["budget_gib"],
        "flops_per_device": flops["total"],
        "matmul_flops_per_device": flops["matmul"],
        "attention_flops_per_device": flops["attention"],
        "xla_cost_analysis_flops": xla_reported,
        "chip_peak_tflops": chip["peak_tflops"],
        "est_step_s": flops["total"] / (chip["peak_tflops"] * 1e12 * args.mfu),
        "mfu_assumed": args.mfu,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
    }


def table(r: dict) -> str:
    rows = [
        ("target", f"{r['topology']} ({r['devices']}× {r['device_kind']}), mesh {r['mesh']}"),
        ("workload", f"{r['height']}×{r['width']} + {r['refs']} ref, {r['image_tokens']} image + "
                     f"{r['text_tokens']} text tokens, batch {r['batch']} × accum {r['grad_accum']}"),
        ("model", f"{r['params']:,} params ({r['num_layers']} blocks, base {r['quantize'] or 'float'}), "
                  f"LoRA r{r['lora_rank']} {r['lora_params']:,} (fp32), remat {r['remat']}, attention {r['attention']}"),
        ("weights / chip", f"{r['weights_bytes_per_device'] / GiB:.2f} GiB"
                           + (f" ({r['host_bytes_per_device'] / GiB:.2f} GiB in host memory, "
                              f"{r['transfer_bytes_per_step'] / GiB:.1f} GiB moved a step: "
                              f"{r['transfer_s']:.2f} s at {r['host_link_gbps']:.0f} GB/s)"
                              if r["offload"] != "none" else "")),
        ("args / temp / out", f"{r['argument_bytes'] / GiB:.2f} / {r['temp_bytes'] / GiB:.2f} / "
                              f"{r['output_bytes'] / GiB:.2f} GiB (aliased {r['alias_bytes'] / GiB:.2f})"),
        ("peak / chip", f"{'≥ ' if r['peak_source'] == 'oom_lower_bound' else ''}"
                        f"{'≈ ' if r['peak_source'] == 'extrapolated' else ''}{r['peak_gib_per_device']:.2f} GiB of {r['hbm_gib']:.0f} "
                        f"(budget {r['budget_gib']:.0f}: {'fits' if r['fits'] else 'DOES NOT FIT'})"),
        *([("note", f"compiler refused the full stack; temporaries extrapolated from {list(r['extrapolated_from'])} "
                    f"blocks (the error claimed {r['oom_reported_temp_bytes'] / GiB:.1f} GiB)")]
          if r["peak_source"] == "extrapolated" else []),
        ("TFLOP / chip / step", f"{r['flops_per_device'] / 1e12:.1f} "
                                f"(matmuls {r['matmul_flops_per_device'] / 1e12:.1f} + "
                                f"splash {r['attention_flops_per_device'] / 1e12:.1f}; XLA's cost analysis, "
                                f"which counts the layer scan once: {r['xla_cost_analysis_flops'] / 1e12:.1f})"),
        ("est. step time", f"{r['est_step_s']:.2f} s at {r['mfu_assumed']:.0%} of "
                           f"{r['chip_peak_tflops']:.0f} TFLOP/s"),
        ("lower / compile", f"{r['lower_s']:.1f} s / {r['compile_s']:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = plan(args)
    except SystemExit:
        raise
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
