"""Training-data loader throughput per host, against what the training step consumes.

    python benchmarks/loader.py --cache /data/cache                 # an existing cache, local or gs://
    python benchmarks/loader.py --make-cache /tmp/loader-cache      # write a cache of the real shapes first
    python benchmarks/loader.py --make-cache /tmp/c --bucket gs://b/loader-cache   # also copy it to a bucket

Each simulated host (`--hosts`) reads only its rows of every global batch, as in training, through
`training.data.BatchLoader` (the prefetching loader the trainer uses). Reported: samples/s per host
(and MB/s) from the cache's location, the rate the step consumes per host at `--step-seconds` (default:
the v5e-8 1024² edit plan, batch 8 in 2.8 s at 100 % MFU, `docs/results.md`), and their ratio
(> 1: the input never starves the chips). `--make-cache` writes random arrays of the real model's shapes
(1024² target + one 1024² reference: 16 × 128 × 128 latents; a 256-token prompt of width 3584 in
bfloat16), so the bytes read per sample are those of a real run. A `gs://` cache is read through the
project's storage layer; an emulator is reached through its usual variables (`STORAGE_EMULATOR_HOST`,
`TENSORSTORE_GCS_HTTP_URL`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from _timing import emit_json, print_table  # noqa: E402
from qwen_edit_jax.cache_format import CachedDataset, CachedSample, write_cache  # noqa: E402
from qwen_edit_jax.training.data import BatchLoader  # noqa: E402
from qwen_edit_jax.utils import storage  # noqa: E402

PLAN_BATCH, PLAN_STEP_S = 8, 2.8  # v5e-8, 1024² edit + 1 reference, global batch 8 (docs/results.md)


def make_cache(path: str, n: int, *, latent_hw: int, channels: int, text_len: int, text_dim: int) -> str:
    """A cache of `n` random samples with the given (real-model) shapes."""
    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            lat = rng.standard_normal((channels, latent_hw, latent_hw), np.float32)
            yield CachedSample(f"s{i:05d}", lat, [lat[::-1].copy()],
                               rng.standard_normal((text_len, text_dim), np.float32).astype(ml_dtypes.bfloat16),
                               np.ones(text_len, bool))

    return write_cache(path, samples(), shard_bytes=256 << 20, overwrite=True, progress=True)


def copy_to_bucket(local: str, url: str) -> str:
    """Upload a finished cache folder; its manifest last (the commit marker)."""
    storage.remove_tree(url)
    return storage.upload_tree(local, url, marker="manifest.json")


def measure(path: str, *, hosts: int, batch: int, steps: int, prefetch: int) -> dict:
    """Samples/s of host 0 of `hosts` reading `steps` batches of `batch` (global) from `path`."""
    dataset = CachedDataset(path)
    loader = BatchLoader(dataset, batch_size=batch, process_index=0, process_count=hosts, prefetch=prefetch,
                         text_buckets=(64, 128, 256, 512, 1024))
    try:
        first = next(loader)  # opens shards, reads headers
        nbytes = sum(a.nbytes for a in first.arrays.values())
        t = time.perf_counter()
        for _ in tqdm(range(steps), desc=f"load {path}", unit="batch", leave=False):
            next(loader)
        dt = time.perf_counter() - t
    finally:
        loader.close()
    rows = batch // hosts
    return {"cache": path, "hosts": hosts, "rows_per_host": rows, "samples_per_s": steps * rows / dt,
            "mb_per_s": steps * nbytes / dt / 1e6, "mb_per_sample": nbytes / rows / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="append", default=[], help="cache folder or gs:// URL (repeatable)")
    ap.add_argument("--make-cache", help="write a cache of the real shapes here first (and measure it)")
    ap.add_argument("--bucket", help="with --make-cache: copy it to this gs:// URL too (and measure it)")
    ap.add_argument("--samples", type=int, default=48, help="samples in --make-cache's cache")
    ap.add_argument("--hosts", type=int, default=1, help="simulated hosts (host 0 is measured)")
    ap.add_argument("--batch", type=int, default=PLAN_BATCH, help="global batch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--step-seconds", type=float, default=PLAN_STEP_S, help="the training step's time")
    ap.add_argument("--latent-hw", type=int, default=128)
    ap.add_argument("--text-len", type=int, default=256)
    args = ap.parse_args()
    caches = list(args.cache)
    if args.make_cache:
        caches.append(make_cache(args.make_cache, args.samples, latent_hw=args.latent_hw, channels=16,
                                 text_len=args.text_len, text_dim=3584))
        if args.bucket:
            caches.append(copy_to_bucket(args.make_cache, args.bucket))
    if not caches:
        ap.error("give --cache PATH or --make-cache DIR")
    need = args.batch / args.hosts / args.step_seconds
    rows = []
    for c in caches:
        r = measure(c, hosts=args.hosts, batch=args.batch, steps=args.steps, prefetch=args.prefetch)
        r["step_needs_samples_per_s"] = need
        r["headroom"] = r["samples_per_s"] / need
        rows.append(r)
    print_table(rows, ["cache", "hosts", "samples_per_s", "mb_per_s", "mb_per_sample", "step_needs_samples_per_s",
                       "headroom"])
    emit_json({"benchmark": "loader", "step_seconds": args.step_seconds, "batch": args.batch, "results": rows})


if __name__ == "__main__":
    main()
