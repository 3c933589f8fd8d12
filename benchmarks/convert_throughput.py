#!/usr/bin/env python
"""Converter and loader memory and speed on a synthetic full-width bf16 checkpoint (a few real-size blocks).

Writes a diffusers folder with the real Qwen-Image widths (3072 wide, 24 heads, text 3584) and
`--layers` blocks (each block is 340M params = 680 MB in bf16), sharded like the official one, then
runs the real CLI under `/usr/bin/time -v` in both directions and reports wall time, MB/s and peak
RSS (also of a process that only imports the converter, as the baseline). MB/s is given twice:
`mb_s` over the whole command (interpreter start and imports, ≈ 1.5 s, included) and `convert_mb_s`
over the conversion the CLI reports. Each direction's input is dropped from the page cache first
(`posix_fadvise`, no root needed), so reads come from disk, as for a 40 GB checkpoint on a machine
with less memory; `--warm` leaves it cached (it usually is not: the converter's outputs skip the cache).
Finally checks that the round trip gave back every tensor bit for bit, and loads the diffusers folder with
`load_transformer(path, dtype=bf16)` (single host, no mesh): its peak RSS above the import baseline,
as a multiple of the checkpoint size (on CPU the "device" copy is host memory too, so 1.0 is the floor).

The default, 8 blocks, is a 5.5 GB checkpoint: the work folder needs ≈ 17 GB of disk and the load ≈ 7 GB
of memory. `--layers 3` (2.1 GB) is quicker, but there the fixed start-up is a quarter of the wall time.

    python benchmarks/convert_throughput.py [--layers 8] [--workdir /tmp/convbench]      # JSON last line
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CLI = os.path.join(ROOT, "convert", "convert_checkpoint.py")


def make_checkpoint(path: str, layers: int, shard: str) -> tuple[int, int]:
    """Synthetic bf16 diffusers folder, written tensor by tensor (never whole in memory)."""
    import numpy as np

    from qwen_edit_jax.config import DiTConfig
    from qwen_edit_jax.weights import keymap
    from qwen_edit_jax.utils.files import atomic_path
    from qwen_edit_jax.weights.writer import TensorSpec, write_sharded

    cfg = DiTConfig(num_layers=layers)
    shapes = keymap.torch_shapes(cfg)
    bf16 = np.dtype("bfloat16")
    specs = [TensorSpec(n, s, bf16) for n, s in sorted(shapes.items())]
    rng = np.random.default_rng(0)

    def stream():
        for s in specs:
            yield s.name, (rng.standard_normal(s.shape, dtype=np.float32) * 0.02).astype(bf16)

    with atomic_path(path, overwrite=True, is_dir=True) as tmp:
        cfg.to_json(os.path.join(tmp, "config.json"))
        write_sharded(tmp, specs, stream(), max_shard_size=shard)
    return len(specs), sum(s.nbytes for s in specs)


def timed(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v: wall seconds, peak RSS (MB), exit code."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall_s": wall, "peak_rss_mb": rss_kb / 1024, "stdout": r.stdout.strip()}


def drop_from_page_cache(path: str) -> None:
    """Evict a folder's files from the page cache (written back first), so the next read comes from disk."""
    from qwen_edit_jax.weights.buffers import drop_cached

    for d, _, files in os.walk(path):
        for f in files:
            drop_cached(os.path.join(d, f))


def bit_identical(a: str, b: str) -> bool:
    from qwen_edit_jax.weights.safetensors_io import TensorSource

    sa, sb = TensorSource.open(a), TensorSource.open(b)
    if sorted(sa.keys()) != sorted(sb.keys()):
        return False
    for k in sa.keys():
        x, y = sa.get(k), sb.get(k)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="full-width blocks (680 MB each in bf16)")
    ap.add_argument("--shard", default="1GB", help="shard size of the synthetic input")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--warm", action="store_true", help="leave each input in the page cache if it is there")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="convbench-")
    os.makedirs(work, exist_ok=True)
    src, merged, std = (os.path.join(work, n) for n in ("diffusers", "merged", "standard"))
    t0 = time.perf_counter()
    n_tensors, nbytes = make_checkpoint(src, args.layers, args.shard)
    gen_s = time.perf_counter() - t0
    py = sys.executable
    base = timed([py, "-c", "import qwen_edit_jax.convert, orbax.checkpoint"])
    rows = []
    for name, cmd in (
        ("to_merged", [py, CLI, "--input", src, "--output", merged, "--direction", "to_merged", "--no-progress",
                       "--overwrite"]),
        ("to_standard", [py, CLI, "--input", merged, "--output", std, "--direction", "to_standard", "--no-progress",
                         "--overwrite"]),
    ):
        if not args.warm:
            drop_from_page_cache(cmd[cmd.index("--input") + 1])
        r = timed(cmd)
        convert_s = float(re.search(r", ([0-9.]+) s, [0-9]+ MB/s\)", r["stdout"]).group(1))
        r.update(name=name, mb_s=nbytes / 1e6 / r["wall_s"], convert_s=convert_s, convert_mb_s=nbytes / 1e6 / convert_s)
        rows.append(r)
    exact = bit_identical(src, std)
    load_code = ("import jax.numpy as jnp, qwen_edit_jax as q; m = q.load_transformer({!r}, dtype=jnp.bfloat16, "
                 "progress=False); print(sum(x.nbytes for x in __import__('jax').tree.leaves(m)))").format(src)
    if not args.warm:
        drop_from_page_cache(src)
    load_base = timed([py, "-c", "import jax.numpy, qwen_edit_jax"])
    load = timed([py, "-c", load_code])
    load_ratio = (load["peak_rss_mb"] - load_base["peak_rss_mb"]) * 2**20 / nbytes
    result = {
        "layers": args.layers, "width": 3072, "tensors": n_tensors, "checkpoint_mb": nbytes / 1e6,
        "largest_tensor_mb": 18432 * 3072 * 2 / 1e6, "generate_s": gen_s, "import_baseline_rss_mb": base["peak_rss_mb"],
        "to_merged": {k: rows[0][k] for k in ("wall_s", "mb_s", "convert_s", "convert_mb_s", "peak_rss_mb")},
        "to_standard": {k: rows[1][k] for k in ("wall_s", "mb_s", "convert_s", "convert_mb_s", "peak_rss_mb")},
        "inputs_in_page_cache": "as left" if args.warm else "dropped",
        "roundtrip_bit_exact": exact, "cpus": os.cpu_count(),
        "load": {"wall_s": load["wall_s"], "peak_rss_mb": load["peak_rss_mb"],
                 "import_baseline_rss_mb": load_base["peak_rss_mb"], "rss_above_baseline_per_checkpoint": load_ratio},
        "loadavg_1min": os.getloadavg()[0],
    }
    print(f"synthetic bf16 checkpoint: {args.layers} blocks at full width, {n_tensors} tensors, "
          f"{nbytes / 1e6:.0f} MB (largest tensor {result['largest_tensor_mb']:.0f} MB)")
    print(f"{'direction':<12} {'wall s':>8} {'MB/s':>8} {'convert s':>10} {'MB/s':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['name']:<12} {r['wall_s']:>8.1f} {r['mb_s']:>8.0f} {r['convert_s']:>10.1f} {r['convert_mb_s']:>8.0f} "
              f"{r['peak_rss_mb']:>12.0f}")
    print(f"{'import only':<12} {base['wall_s']:>8.1f} {'':>8} {base['peak_rss_mb']:>12.0f}")
    print(f"round trip bit-exact: {exact}")
    print(f"load_transformer (bf16, one device): {load['wall_s']:.1f} s, peak RSS {load['peak_rss_mb']:.0f} MB "
          f"(import only {load_base['peak_rss_mb']:.0f} MB) = {load_ratio:.2f}× the checkpoint above the baseline")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
