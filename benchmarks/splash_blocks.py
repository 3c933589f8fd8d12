"""Search splash attention block sizes for a TPU generation without a TPU: AOT compiles + a time model.

AOT-compiles (libtpu, on this CPU machine) the model's own splash kernel
(`models.kernels.splash.splash_attention`, inside `shard_map`, as in the training step) at the
1024² edit's attention shape — per chip 1 sample × 24 heads × 128, joint length 4096 target + 4096
reference + 256 text = 8448 tokens — forward and forward + fused backward, for a grid of
`BlockSizes`, and reports for each what the TPU compiler says:

- whether it compiles (Mosaic rejects blocks that overflow VMEM: the error is recorded),
- temporaries (`memory_analysis`; the fused backward writes one dq partial per kv block:
  (S / block_kv_dkv) × H × S × d),
- `cost_analysis()`: keys 'flops', 'bytes accessed', 'bytes accessed{i}' / 'bytes accessedout{}',
  'utilization{i}', 'optimal_seconds'. On TPU these cover only the XLA ops around the kernels (layout
  copies, padding, the sum of the fused backward's dq partials): splash's `pallas_call`s carry no cost
  estimate, so the compiler counts no FLOPs, bytes or time for the Mosaic custom calls, and
  'optimal_seconds' is even negative (≈ −2.0 s) for forward + backward programs (kept as
  `xla_optimal_seconds`, not used).

Because of that the ranking uses a documented model per kernel (per chip):

    t = max(MXU FLOPs / peak, HBM bytes / bandwidth) + grid steps × step overhead

forward: FLOPs 4·H·S²·d, bytes H·S·d·2 B·(2·S/block_q + 2) (K and V are streamed once per query
block); fused dkv backward: FLOPs 10·H·S²·d, bytes H·S·d·2 B·(3·S/block_kv_dkv + 4) (q, dO and the
dq partial once per kv block); MXU FLOPs grow when a block edge is not a multiple of the MXU width;
grid steps H·(S/bq)·(S/bkv); `--step-overhead-us` (default 0.35 µs per grid step) is an assumption,
not a measurement. Plus `xla_ops_s` = max(XLA flops / peak, XLA bytes accessed / bandwidth) for the
XLA ops around the kernels. The estimate is a model: it says which blocks move fewer bytes and take
fewer steps, not real times.

    python benchmarks/splash_blocks.py --topology v5e:2x4
    python benchmarks/splash_blocks.py --topology v6e:2x4 --batch 8

Needs the tpu-plan extra (libtpu). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# peak dense bf16 FLOP/s and HBM bandwidth per chip (cloud.google.com/tpu/docs/v5e, /v5p, /v6e)
# and MXU width (v5e/v5p/v4: 128×128 MXUs, v6e: 256×256; a block edge that is not a multiple wastes a pass)
CHIPS = {"v5e": dict(tflops=197.0, hbm_gbps=819.0, mxu=128), "v5p": dict(tflops=459.0, hbm_gbps=2765.0, mxu=128),
         "v6e": dict(tflops=918.0, hbm_gbps=1640.0, mxu=256), "v4": dict(tflops=275.0, hbm_gbps=1200.0, mxu=128)}
BLOCKS = (256, 384, 512, 768, 1024, 1408, 2048)  # multiples of 128; 384/768/1408 divide 8448 = 128·66


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5e:2x4")
    p.add_argument("--batch", type=int, default=8, help="global batch (sharded over all chips, like --mesh 1,-1,1)")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=2 * 4096 + 256, help="joint length (target + reference + text)")
    p.add_argument("--text-len", type=int, default=256, help="trailing tokens with a key mask (padded prompt)")
    p.add_argument("--blocks", default=",".join(map(str, BLOCKS)), help="block_q / block_kv candidates")
    p.add_argument("--step-overhead-us", type=float, default=0.35, help="assumed cost of one Pallas grid step")
    p.add_argument("--top", type=int, default=12, help="rows of each table")
    return p.parse_args(argv)


def _cost(compiled) -> dict:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {k: float(v) for k, v in (c or {}).items()}


def padded_for(sp: int, *blocks: int) -> int:
    """`sp` rounded up so every block divides it (blocks that do not divide 8448 cost extra padding)."""
    lcm = math.lcm(128, *blocks)
    return -(-sp // lcm) * lcm


def compile_one(mesh, shape, sizes, grad: bool, chip: dict) -> dict:
    """AOT-compile the model's splash attention (forward, or forward + backward) with `sizes`; the
    sequence is padded further when a block does not divide the 128-padded length."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwen_edit_jax.models.kernels.splash import splash_attention

    b, s, h, d, text = shape
    s = max(s, padded_for(s, sizes.block_q, sizes.block_kv, sizes.block_q_dkv, sizes.block_kv_dkv))
    attn = functools.partial(splash_attention, sizes=sizes)
    x = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    m = jax.ShapeDtypeStruct((b, s), jnp.bool_, sharding=NamedSharding(mesh, P(("data", "fsdp"))))

    def loss(q, k, v, mask):
        return jnp.sum(attn(q, k, v, mask).astype(jnp.float32))

    fn = jax.grad(loss, argnums=(0, 1, 2)) if grad else loss
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = jax.jit(fn).lower(x, x, x, m).compile()
    except Exception as e:  # Mosaic: VMEM overflow, bad block shapes
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "openxla.org/xla/errors" not in ln]
        key = ("vmem", "resource_exhausted", "out of memory", "exceeds", "mosaic")
        return {"ok": False, "error": next((ln for ln in lines if any(k in ln.lower() for k in key)),
                                           lines[0] if lines else type(e).__name__)[:300]}
    mem = compiled.memory_analysis()
    cost = _cost(compiled)
    return {"ok": True, "compile_s": time.perf_counter() - t0, "temp_bytes": int(mem.temp_size_in_bytes),
            "xla_optimal_seconds": cost.get("optimal_seconds", 0.0), "xla_bytes": cost.get("bytes accessed", 0.0),
            "xla_flops": cost.get("flops", 0.0), "cost_keys": sorted(cost),
            # the XLA ops around the kernels (layout, padding, dq-partial sum): a roofline on XLA's own counts
            "xla_ops_s": max(cost.get("flops", 0.0) / (chip["tflops"] * 1e12),
                                 cost.get("bytes accessed", 0.0) / (chip["hbm_gbps"] * 1e9))}


def model_time(kind: str, sp: int, h: int, d: int, bq: int, bkv: int, bkvc: int, chip: dict, step_us: float) -> dict:
    """Roofline + grid-step model of one splash kernel per sample (kind 'fwd' or 'dkv', fused backward)."""
    nq, nkv = sp // bq, sp // bkv
    if kind == "fwd":
        flops, bytes_ = 4.0 * h * sp * sp * d, h * sp * d * 2.0 * (2 * nq + 2)
    else:
        flops, bytes_ = 10.0 * h * sp * sp * d, h * sp * d * 2.0 * (3 * nkv + 4)
    steps = h * nq * nkv
    tile = lambda b: -(-b // chip["mxu"]) * chip["mxu"] / b  # noqa: E731  MXU passes wasted on a ragged edge
    flops *= tile(bq) * tile(bkvc)
    mxu, hbm, ovh = flops / (chip["tflops"] * 1e12), bytes_ / (chip["hbm_gbps"] * 1e9), steps * step_us * 1e-6
    return {"flops": flops, "hbm_bytes": bytes_, "grid_steps": steps, "mxu_s": mxu, "hbm_s": hbm,
            "overhead_s": ovh, "model_s": max(mxu, hbm) + ovh, "inner_steps": steps * (bkv // bkvc)}


def search(args) -> dict:
    from jax.experimental import topologies
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    from qwen_edit_jax import parallel
    from qwen_edit_jax.models.kernels import splash

    gen = args.topology.split(":")[0].lower()
    chip = CHIPS[gen]
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    mesh = parallel.make_mesh(1, -1, 1, devices=devices)
    kind = devices[0].device_kind
    per_dev = max(1, args.batch // len(devices))
    sp = splash.padded_length(args.seq)
    h, d = args.heads, args.head_dim
    shape = (args.batch, args.seq, h, d, args.text_len)
    cand = [b for b in (int(x) for x in args.blocks.split(",")) if b % 128 == 0]
    skipped = [b for b in cand if sp % b]  # these need extra padding (the model charges it)

    def sizes(bq, bkv, bkvc, bqd, bkvd, bkvdc):
        return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkvc, block_q_dkv=bqd, block_kv_dkv=bkvd,
                             block_kv_dkv_compute=bkvdc, use_fused_bwd_kernel=True)

    def compute_blocks(bkv):
        return [bkv] + [256] * (bkv > 256 and bkv % 256 == 0)  # whole block, or 256-wide compute chunks

    base = splash.block_sizes(sp, kind)  # what splash.py picks today for this chip
    old = 256 if sp % 512 else 512  # the previous rule: largest of 512/256/128 dividing sp
    rows_f = []
    too_long = lambda *bs: padded_for(sp, *bs) > 1.25 * sp  # noqa: E731  mixed blocks whose lcm pads far
    for bq, bkv in itertools.product(cand, cand):  # forward: block_q × block_kv × block_kv_compute
        if too_long(bq, bkv, old):
            continue
        for bkvc in compute_blocks(bkv):
            r = compile_one(mesh, shape, sizes(bq, bkv, bkvc, old, old, old), grad=False, chip=chip)
            r.update(bq=bq, bkv=bkv, bkvc=bkvc, sp=padded_for(sp, bq, bkv, old),
                     **model_time("fwd", padded_for(sp, bq, bkv, old), h, d, bq, bkv, bkvc, chip,
                                  args.step_overhead_us))
            r["model_s"] *= per_dev
            rows_f.append(r)
            print(f"fwd {bq:5d} {bkv:5d} {bkvc:5d} {'ok' if r['ok'] else 'FAIL'}", file=sys.stderr, flush=True)
    ok_f = sorted((r for r in rows_f if r["ok"]), key=lambda r: (r["model_s"] + r["xla_ops_s"], -r["bq"]))
    best_f = ok_f[0]
    rows_b = []
    for bqd, bkvd in itertools.product(cand, cand):  # fused backward with the best forward
        if too_long(best_f["bq"], best_f["bkv"], bqd, bkvd):
            continue
        for bkvdc in compute_blocks(bkvd):
            fwd = (best_f["bq"], best_f["bkv"], best_f["bkvc"])
            r = compile_one(mesh, shape, sizes(*fwd, bqd, bkvd, bkvdc), grad=True, chip=chip)
            sp_b = padded_for(sp, best_f["bq"], best_f["bkv"], bqd, bkvd)
            r.update(bq=bqd, bkv=bkvd, bkvc=bkvdc, sp=sp_b,
                     **model_time("dkv", sp_b, h, d, bqd, bkvd, bkvdc, chip, args.step_overhead_us))
            r["model_s"] *= per_dev
            rows_b.append(r)
            print(f"dkv {bqd:5d} {bkvd:5d} {bkvdc:5d} {'ok' if r['ok'] else 'FAIL'}", file=sys.stderr, flush=True)
    ok_b = sorted((r for r in rows_b if r["ok"]), key=lambda r: (r["model_s"] + r["xla_ops_s"], r["temp_bytes"]))
    best_b = ok_b[0]

    def total(fwd_blocks, bwd_blocks) -> dict:
        """Forward + fused backward (grad compile) of one block configuration: model + XLA figures."""
        r = compile_one(mesh, shape, sizes(*fwd_blocks, *bwd_blocks), grad=True, chip=chip)
        spt = padded_for(sp, *fwd_blocks, *bwd_blocks)
        f = model_time("fwd", spt, h, d, *fwd_blocks, chip, args.step_overhead_us)["model_s"]
        b = model_time("dkv", spt, h, d, *bwd_blocks, chip, args.step_overhead_us)["model_s"]
        r.update(blocks=list(fwd_blocks) + list(bwd_blocks), sp=spt, kernel_model_s=(f + b) * per_dev,
                 est_s=(f + b) * per_dev + r.get("xla_ops_s", 0.0))
        return r

    chosen = (best_f["bq"], best_f["bkv"], best_f["bkvc"]), (best_b["bq"], best_b["bkv"], best_b["bkvc"])
    return {
        "topology": args.topology, "device_kind": kind, "devices": len(devices), "batch_per_device": per_dev,
        "heads": h, "head_dim": d, "seq": args.seq, "padded": sp, "candidates": cand, "skipped_not_dividing": skipped,
        "chip": chip, "step_overhead_us": args.step_overhead_us,
        "cost_analysis_keys": sorted(set().union(*(r.get("cost_keys", []) for r in rows_f + rows_b))),
        "forward": [{k: v for k, v in r.items() if k != "cost_keys"} for r in rows_f],
        "backward": [{k: v for k, v in r.items() if k != "cost_keys"} for r in rows_b],
        "best_forward": [best_f["bq"], best_f["bkv"], best_f["bkvc"]],
        "best_backward": [best_b["bq"], best_b["bkv"], best_b["bkvc"]],
        "previous": total((old,) * 3, (old,) * 3),
        "current_table": total((base.block_q, base.block_kv, base.block_kv_compute),
                               (base.block_q_dkv, base.block_kv_dkv, base.block_kv_dkv_compute)),
        "best": total(*chosen),
    }


def table(r: dict, top: int) -> str:
    out = [f"{r['topology']} ({r['device_kind']}), per chip {r['batch_per_device']} × {r['heads']} heads × "
           f"{r['padded']} (from {r['seq']}) × {r['head_dim']}; blocks {r['candidates']} "
           f"(not dividing {r['padded']}, so padded further: {r['skipped_not_dividing']})",
           f"cost_analysis keys: {', '.join(r['cost_analysis_keys'])}"]
    for name in ("forward", "backward"):
        rows = sorted(r[name], key=lambda x: (not x["ok"], x["model_s"] + x.get("xla_ops_s", 0.0)))
        out.append(f"\n{name}: bq bkv bkv_c | padded S | model ms (mxu / hbm / overhead) | grid steps | "
                   f"XLA ops ms | temp MiB")
        for x in rows[:top] + [x for x in rows[top:] if not x["ok"]]:
            if not x["ok"]:
                out.append(f"  {x['bq']:5d} {x['bkv']:5d} {x['bkvc']:5d} | {x['sp']:6d} | FAILED: {x['error']}")
                continue
            out.append(f"  {x['bq']:5d} {x['bkv']:5d} {x['bkvc']:5d} | {x['sp']:6d} | {x['model_s'] * 1e3:7.2f} "
                       f"({x['mxu_s'] * 1e3:.2f} / "
                       f"{x['hbm_s'] * 1e3:.2f} / {x['overhead_s'] * 1e3:.2f}) | {x['grid_steps']:7d} | "
                       f"{x['xla_ops_s'] * 1e3:7.3f} | {x['temp_bytes'] / 2**20:8.1f}")
    out.append("\nforward + backward (grad compile): blocks | est ms = kernels model + XLA ops | temp MiB")
    for name in ("previous", "current_table", "best"):
        x = r[name]
        if x.get("ok"):
            out.append(f"  {name:13s} {x['blocks']} S={x['sp']} | {x['est_s'] * 1e3:.2f} = "
                       f"{x['kernel_model_s'] * 1e3:.2f} + "
                       f"{x['xla_ops_s'] * 1e3:.3f} | {x['temp_bytes'] / 2**20:.1f}")
        else:
            out.append(f"  {name:13s} {x['blocks']} | FAILED: {x.get('error')}")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.topology.split(":")[0].lower() not in CHIPS:
        print(f"error: unknown TPU generation in {args.topology}; known: {sorted(CHIPS)}", file=sys.stderr)
        return 2
    r = search(args)
    print(table(r, args.top))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
