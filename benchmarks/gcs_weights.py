#!/usr/bin/env python
"""Safetensors base weights in a bucket: a whole-file local copy (what `load_transformer("gs://…")` does)
against reading every tensor where it lies with one range request each (what a streaming reader would do).

Uploads one synthetic safetensors file (`--tensors` tensors of `--kb` KB each) to `--bucket` (default: a
Cloud Storage emulator started here on localhost, `tests/gcs_emulator.py`), then times
* `local_copy`: `utils.storage.local_copy` (whole file, one sequential stream) + reading every tensor
  from the local memory map;
* `range_reads`: one ranged GET per tensor through gcsfs, one after another;
* `range_reads_parallel`: the same requests, 8 at a time (gcsfs `cat_ranges`).
Prints one JSON line. On the emulator the per-request latency is that of localhost; on real Cloud
Storage each request also pays its first-byte latency, which is what decides between the two.

    python benchmarks/gcs_weights.py [--tensors 400] [--kb 256] [--bucket gs://my-bucket/tmp]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensors", type=int, default=400)
    p.add_argument("--kb", type=int, default=256)
    p.add_argument("--bucket", help="a gs:// prefix to use instead of the emulator (objects are deleted after)")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        if args.bucket:
            base = args.bucket.rstrip("/")
        else:
            import gcs_emulator

            base = stack.enter_context(gcs_emulator.start())
        print(json.dumps(run(base + "/gcs-weights-bench", args.tensors, args.kb << 10)))


def run(url_dir: str, n: int, nbytes: int) -> dict:
    import numpy as np
    from etils.epath import backend
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from qwen_edit_jax.utils import storage

    rng = np.random.default_rng(0)
    tensors = {f"t{i:05d}": rng.integers(0, 255, nbytes, dtype=np.uint8) for i in range(n)}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "w.safetensors")
        save_file(tensors, src)
        url = f"{url_dir}/w.safetensors"
        storage.upload_file(src, url)
        with open(src, "rb") as f:  # each tensor's byte range in the file, from the safetensors header
            header = 8 + int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header - 8))
        ranges = [(header + v["data_offsets"][0], header + v["data_offsets"][1]) for k, v in sorted(meta.items())
                  if k != "__metadata__"]
        fs = backend.fsspec_backend.fs(url)
        key = url[len("gs://"):]

        t0 = time.perf_counter()
        local = storage.local_copy(url, root=os.path.join(tmp, "cache"), progress=False)
        with safe_open(local, "np") as f:
            total = sum(f.get_tensor(k).nbytes for k in f.keys())
        t_copy = time.perf_counter() - t0
        assert total == n * nbytes

        t0 = time.perf_counter()
        got = sum(len(fs.cat_file(key, start=a, end=b)) for a, b in ranges)
        t_seq = time.perf_counter() - t0
        assert got == n * nbytes

        t0 = time.perf_counter()
        got = sum(len(b) for b in fs.cat_ranges([key] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges],
                                                batch_size=8))
        t_par = time.perf_counter() - t0
        assert got == n * nbytes
        storage.remove_tree(url_dir)
    mb = n * nbytes / 1e6
    return {"bucket": "emulator" if "STORAGE_EMULATOR_HOST" in os.environ else url_dir, "tensors": n,
            "mb": round(mb, 1), "local_copy_s": round(t_copy, 3), "range_reads_s": round(t_seq, 3),
            "range_reads_parallel_s": round(t_par, 3), "local_copy_mb_s": round(mb / t_copy, 1),
            "range_reads_mb_s": round(mb / t_seq, 1), "range_reads_parallel_mb_s": round(mb / t_par, 1)}


if __name__ == "__main__":
    main()
