"""Time one attention call, forward and forward + backward, for the JAX kernels and torch SDPA.

    python benchmarks/attention.py                       # 2,176 and 4,352 tokens, 8 heads × 64, fp32
    python benchmarks/attention.py --tokens 2176 --flash-blocks 544x544x2 1088x544x8 --json

Kernels: `xla` (materialised scores), `chunked` (query chunks), `flash` (blocked online softmax,
recomputing custom VJP; `--flash-blocks QxK[xH]` adds one row per tile shape, for tuning) and
`torch.nn.functional.scaled_dot_product_attention` on the same inputs ([B, H, S, d] for torch; on the
GPU when JAX runs on one).
All run in the same process, interleaved: every round times each kernel once, forward then
forward + backward (a VJP with a random cotangent, grads w.r.t. q, k, v), so background load on a
shared machine hits them alike; medians over `--iters` rounds, ratios to torch taken per round.
`cpu_ms` is the process CPU time per call (less sensitive to other processes than wall time).
The last line with `--json` is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen_edit_jax.utils.accelerators import cpu_unless_accelerator  # noqa: E402

cpu_unless_accelerator()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _timing import emit_json, print_table, reference_missing, time_fn  # noqa: E402
from qwen_edit_jax.models.kernels.flash import BLOCK_H, BLOCK_K, BLOCK_Q, _block, flash_attention  # noqa: E402
from qwen_edit_jax.models.kernels.xla import chunked_attention, xla_attention  # noqa: E402

Runner = tuple[Callable[[], object], Callable[[], object]]  # (forward, forward + backward), both blocking


def jax_runner(att, q, k, v, ct, mask) -> Runner:
    fwd = jax.jit(lambda q, k, v: att(q, k, v, mask))
    fb = jax.jit(lambda q, k, v, ct: jax.vjp(lambda q, k, v: att(q, k, v, mask), q, k, v)[1](ct))
    return (lambda: fwd(q, k, v).block_until_ready()), (lambda: jax.block_until_ready(fb(q, k, v, ct)))


def torch_runner(q, k, v, ct, mask) -> Runner:
    import torch

    dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    tq, tk, tv, tct = (torch.from_numpy(np.array(t)).transpose(1, 2).contiguous().to(dev) for t in (q, k, v, ct))
    tmask = None if mask is None else torch.from_numpy(np.array(mask))[:, None, None, :].to(dev)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    leaves = [t.clone().requires_grad_() for t in (tq, tk, tv)]

    def fwd():
        with torch.no_grad():
            sdpa(tq, tk, tv, attn_mask=tmask)
        sync()

    def fb():
        for t in leaves:
            t.grad = None
        sdpa(*leaves, attn_mask=tmask).backward(tct)
        sync()

    return fwd, fb


def runners(names: list[str], blocks: list[str], q, k, v, ct, mask) -> dict[str, Runner]:
    out = {}
    for name in names:
        if name == "torch":
            out["torch sdpa"] = torch_runner(q, k, v, ct, mask)
        elif name == "flash":
            if not blocks:  # the kernel's own defaults
                out[f"flash {_block(q.shape[1], BLOCK_Q)}x{_block(k.shape[1], BLOCK_K)}"] = jax_runner(
                    flash_attention, q, k, v, ct, mask)
            for blk in blocks:
                bq, bk, bh = ([int(x) for x in blk.split("x")] + [BLOCK_H])[:3]
                att = partial(flash_attention, block_q=bq, block_k=bk, block_h=bh)
                out[f"flash {_block(q.shape[1], bq)}x{_block(k.shape[1], bk)}x{bh}"] = jax_runner(
                    att, q, k, v, ct, mask)
        else:
            out[name] = jax_runner({"xla": xla_attention, "chunked": chunked_attention}[name], q, k, v, ct, mask)
    return out


def measure(rs: dict[str, Runner], iters: int) -> dict[str, dict]:
    """Compile/warm each, then `iters` interleaved rounds (forward, forward + backward per kernel)."""
    for fwd, fb in rs.values():
        for f in (fwd, fb, fwd, fb):
            f()
    rec = {name: {m: {"wall": [], "cpu": [], "clean": 0} for m in ("fwd", "fb")} for name in rs}
    for _ in range(iters):
        for name, (fwd, fb) in rs.items():
            for mode, f in (("fwd", fwd), ("fb", fb)):
                c0 = time.process_time()
                r = time_fn(f, iters=1, warmup=0, min_clean=1)
                rec[name][mode]["cpu"].append(time.process_time() - c0)
                rec[name][mode]["wall"].append(r["median_s"])
                rec[name][mode]["clean"] += r["clean"]
    return rec


def summarise(tokens: int, rec: dict[str, dict]) -> list[dict]:
    ref = rec.get("torch sdpa")
    rows = []
    for name, modes in rec.items():
        row = {"tokens": tokens, "impl": name}
        for m, r in modes.items():
            row[f"{m}_ms"] = 1e3 * statistics.median(r["wall"])
            row[f"{m}_best_ms"] = 1e3 * min(r["wall"])
            row[f"{m}_cpu_ms"] = 1e3 * statistics.median(r["cpu"])
            row[f"{m}_clean"] = r["clean"]
            if ref is not None:  # per-round ratio, then the median: both sides under the same load
                row[f"{m}_vs_torch"] = statistics.median(a / b for a, b in zip(r["wall"], ref[m]["wall"]))
                row[f"{m}_cpu_vs_torch"] = statistics.median(a / b for a, b in zip(r["cpu"], ref[m]["cpu"]))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2176, 4352])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--masked-keys", type=int, default=0, help="mask this many leading keys (padded text)")
    p.add_argument("--kernels", nargs="+", default=["xla", "chunked", "flash", "torch"])
    p.add_argument("--flash-blocks", nargs="*", default=[],
                   help="flash tiles block_q x block_k [x block_h] (default: the kernel's own)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if "torch" in args.kernels and reference_missing("torch"):
        args.kernels.remove("torch")
    load0 = os.getloadavg()
    rows = []
    for s in args.tokens:
        rng = np.random.default_rng(0)
        q, k, v, ct = (jnp.asarray(rng.standard_normal((args.batch, s, args.heads, args.head_dim)), jnp.float32)
                       for _ in range(4))
        mask = None if not args.masked_keys else jnp.arange(s)[None].repeat(args.batch, 0) >= args.masked_keys
        rows += summarise(s, measure(runners(args.kernels, args.flash_blocks, q, k, v, ct, mask), args.iters))
    load1 = os.getloadavg()
    print(f"attention, batch {args.batch}, {args.heads} heads x {args.head_dim}, fp32, "
          f"{args.masked_keys} masked keys; median of {args.iters} interleaved rounds; "
          f"load average {load0[0]:.2f} -> {load1[0]:.2f} on {os.cpu_count()} CPUs")
    print_table(rows, ["tokens", "impl", "fwd_ms", "fwd_vs_torch", "fb_ms", "fb_vs_torch", "fwd_cpu_ms",
                       "fb_cpu_ms", "fwd_clean", "fb_clean"])
    result = {"device": jax.devices()[0].device_kind, "heads": args.heads, "head_dim": args.head_dim,
              "batch": args.batch, "masked_keys": args.masked_keys, "iters": args.iters,
              "load_avg_start": load0, "load_avg_end": load1, "cpus": os.cpu_count(), "results": rows}
    if args.json:
        emit_json(result)
    return result


if __name__ == "__main__":
    main()
