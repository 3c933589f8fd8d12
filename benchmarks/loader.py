"""The training loader's throughput per host: samples/s reading a cache from a local folder and from `gs://`.

    python benchmarks/loader.py --hosts 8 --json                  # local folder vs the Cloud Storage emulator
    python benchmarks/loader.py --hosts 8 --gcs gs://my-bucket/tmp/loader-bench --json   # a real bucket

Writes a synthetic cache at Qwen-Image-Edit sizes (16-channel float32 latents of `--latent`² per image, one
reference, `--prompt-len` × 3584 bf16 prompt embeddings), then times host 0 of `--hosts` (one row of each
global batch of `--hosts` rows) loading every step of `--epochs` epochs with `BatchLoader` (prefetch off: the
reads and the collation themselves, on one thread, as the loader's background thread does them). The bucket
is, without `--gcs`, the tests' Cloud Storage emulator on localhost (`tests/gcs_emulator.py`, the test extra):
a single-threaded Python server, so its figure is the emulator's, not a bucket's. With `--gcs` the cache is
uploaded there first (write access needed) and removed afterwards. The JSON line is last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from _timing import emit_json, print_table  # noqa: E402
from qwen_edit_jax.cache_format import MANIFEST, CachedDataset, CachedSample, write_cache  # noqa: E402
from qwen_edit_jax.training.data import BatchLoader  # noqa: E402
from qwen_edit_jax.utils import storage  # noqa: E402

CHANNELS, JOINT = 16, 3584  # Qwen-Image-Edit's VAE latent channels and text width


def samples(n: int, latent: int, prompt_len: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield CachedSample(f"s{i:05d}", rng.standard_normal((CHANNELS, latent, latent), np.float32),
                           [rng.standard_normal((CHANNELS, latent, latent), np.float32)],
                           rng.standard_normal((prompt_len, JOINT), np.float32).astype(ml_dtypes.bfloat16),
                           np.ones(prompt_len, bool))


def measure(path: str, hosts: int, epochs: int, prompt_len: int) -> dict:
    """Host 0's samples/s over `epochs` epochs (after one warm-up step), and the bytes it fetched."""
    ds = CachedDataset(path)
    loader = BatchLoader(ds, batch_size=hosts, text_buckets=(prompt_len,), process_index=0, process_count=hosts,
                         prefetch=0, seed=0)
    next(loader)  # opens the shards (a bucket: their headers)
    steps = loader.steps_per_epoch * epochs
    t0 = time.perf_counter()
    for _ in range(steps):
        next(loader)
    dt = time.perf_counter() - t0
    total = sum(s["bytes"] for s in ds.shards)
    epochs_read = (steps + 1) / loader.steps_per_epoch
    return {"samples_per_s": steps / dt, "ms_per_sample": 1e3 * dt / steps, "steps": steps,
            "bytes_fetched": ds.bytes_fetched, "cache_bytes": total,
            "fetched_share_per_epoch": ds.bytes_fetched / epochs_read / total}  # ≈ 1/hosts (0: mmap, not counted)


@contextlib.contextmanager
def bucket(url: str | None):
    if url:
        yield url
        return
    try:
        from tests import gcs_emulator  # the test extra's emulator
    except ImportError as e:
        sys.exit(f"error: the emulator needs the test extra (pip install -e '.[test]'), or pass --gcs URL ({e})")
    with gcs_emulator.start() as b:
        yield f"{b}/loader-bench"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--latent", type=int, default=128, help="latent side (128: a 1024x1024 image)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--hosts", type=int, default=8, help="hosts sharing each global batch, one row each")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--gcs", help="a gs:// prefix to upload the cache to and read from (default: the emulator)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.samples < 2 * a.hosts:
        p.error(f"--samples must be at least 2 x --hosts ({2 * a.hosts}): one epoch needs two steps or more")
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as d:
        local = str(write_cache(os.path.join(d, "cache"), samples(a.samples, a.latent, a.prompt_len)))
        rows.append({"source": "local", **measure(local, a.hosts, a.epochs, a.prompt_len)})
        with bucket(a.gcs) as url:
            storage.upload_tree(local, url, marker=MANIFEST)
            try:
                rows.append({"source": "emulator" if a.gcs is None else "gcs",
                             **measure(url, a.hosts, a.epochs, a.prompt_len)})
            finally:
                storage.remove_tree(url)
    sample_mb = rows[0]["cache_bytes"] / a.samples / 2**20
    print(f"{a.samples} samples of {sample_mb:.2f} MiB (latent {a.latent}x{a.latent} + 1 reference, "
          f"{a.prompt_len} prompt tokens); host 0 of {a.hosts}")
    print_table(rows, ["source", "samples_per_s", "ms_per_sample", "steps", "bytes_fetched", "cache_bytes",
                       "fetched_share_per_epoch"])
    if a.json:
        emit_json({"benchmark": "loader", "hosts": a.hosts, "sample_mib": sample_mb, "latent": a.latent,
                   "prompt_len": a.prompt_len, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
