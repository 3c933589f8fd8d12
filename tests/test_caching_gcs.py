"""The resumable cache writer on a bucket (the Cloud Storage emulator), without encoders: layout (shards at their
final names, records in OUTPUT.partial/, manifest.json last), resume after an interruption, and the refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gcs_emulator import objects
from qwen_edit_jax.cache_format import MANIFEST, CachedDataset, CachedSample
from qwen_edit_jax.caching.writer import JOB_FORMAT, CacheExists, PartialCache
from qwen_edit_jax.utils import storage


def _sample(i: int) -> CachedSample:
    rng = np.random.default_rng(i)
    return CachedSample(f"s{i}", rng.standard_normal((4, 2, 2)).astype(np.float32),
                        [rng.standard_normal((4, 2, 4)).astype(np.float32)],
                        rng.standard_normal((3, 8)).astype(np.float32), np.ones(3, bool))


def _job(fingerprint: str = "f1", n: int = 4) -> dict:
    return {"format": JOB_FORMAT, "fingerprint": fingerprint, "options": {"resolution": 64},
            "samples": [[f"s{i}"] for i in range(n)]}


def _names(url: str) -> list[str]:
    """Object names under the folder `url` (not under `url.partial`), relative to it."""
    skip = len(url.split("/", 3)[3]) + 1
    return [n.split("/", 1)[1][skip:] for n in objects(url + "/")]


def _write(url: str, start: int, stop: int, job: dict, **kw) -> PartialCache:
    cache = PartialCache(url, job, log=lambda m: None, **kw)
    assert cache.done == start
    for i in range(start, stop):
        cache.add([_sample(i)])
        cache.flush()  # one shard per sample
    return cache


def test_bucket_cache_resumes_and_commits_with_the_manifest(gcs_dir, tmp_path):
    out = f"{gcs_dir}/cache"
    first = _write(out, 0, 2, _job())  # "killed" after two shards: no finish()
    assert _names(out) == ["shard-00000.safetensors", "shard-00001.safetensors"]  # no manifest: not a cache
    assert _names(f"{out}.partial") == ["job.json", "shard-00000.json", "shard-00001.json"]
    assert not os.listdir(first.staging)  # each shard's local copy is gone once uploaded
    storage.write_bytes(f"{out}/shard-00002.safetensors", b"a shard whose record never came")
    with pytest.raises(FileExistsError, match=r"cache.partial: an interrupted run of a different job is there "
                                              r"\(resolution 64 -> 96\)"):
        PartialCache(out, {**_job("f2"), "options": {"resolution": 96}}, log=lambda m: None)
    second = _write(out, 2, 4, _job())
    assert second.finish({"note": "x"}) == out
    assert _names(out) == [MANIFEST] + [f"shard-{i:05d}.safetensors" for i in range(4)]
    assert objects(f"{out}.partial/") == []
    local = tmp_path / "copy"
    for name in _names(out):
        storage.download_file(f"{out}/{name}", local / name)
    ds = CachedDataset(local, verify=True)
    assert [i.sample_id for i in ds.infos] == ["s0", "s1", "s2", "s3"] and ds.metadata["note"] == "x"
    for i in range(4):
        np.testing.assert_array_equal(ds[i].target, _sample(i).target)
    with pytest.raises(CacheExists, match="already a complete cache"):
        PartialCache(out, _job(), log=lambda m: None)
    with pytest.raises(FileExistsError, match="a cached dataset made from other inputs or options exists there; "
                                              "pass --overwrite"):
        PartialCache(out, _job("f2"), log=lambda m: None)
    third = _write(out, 0, 1, _job("f2", 1), overwrite=True)  # the old cache is uncommitted and deleted
    assert _names(out) == ["shard-00000.safetensors"]
    third.finish({})
    assert _names(out) == [MANIFEST, "shard-00000.safetensors"]


def test_bucket_prefix_of_something_else_is_refused(gcs_dir):
    storage.write_text(f"{gcs_dir}/other/x.txt", "x")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"--output gs://.*/other: holds objects but no manifest.json and no "
                                                  r"\.partial records of an unfinished run; choose another prefix"):
            PartialCache(f"{gcs_dir}/other", _job(), overwrite=overwrite, log=lambda m: None)
    assert _names(f"{gcs_dir}/other") == ["x.txt"]
