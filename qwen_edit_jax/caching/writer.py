"""A resumable cache writer: shards are committed as they fill; a kill loses at most the samples of
the shard being filled, and the same command resumes after the last complete shard.

**Local output** (`OUTPUT` a folder): everything goes to `OUTPUT.partial/`:
* `job.json`: what is being cached (options, model files, every planned sample with its files' sizes
  and modification times): a rerun resumes only when its job is the same;
* `shard-NNNNN.safetensors` + `shard-NNNNN.json`: a shard and its record (the shard's manifest
  entries), the record written (atomically) after the shard is on disk, so a shard counts only
  when its record exists and the sizes agree.
When every sample is written, `manifest.json` is assembled from the records, the records and
`job.json` are removed, and the folder is renamed to `OUTPUT` (the format of `cache_format`).

**Bucket output** (`OUTPUT` = `gs://bucket/prefix`; object stores have no rename): the shards go
straight to their final names `OUTPUT/shard-NNNNN.safetensors`, each written to a local folder first (one
per output under the system's temporary folder, cleared when a run opens it), uploaded whole (an object
appears only complete) and deleted locally; `job.json` and the records live in `OUTPUT.partial/`.
`OUTPUT/manifest.json`, written last, is the commit marker: a prefix without it is not a cache
(`CachedDataset` refuses it), so readers never take a half-written one. Then `OUTPUT.partial/` is
deleted. `--overwrite` of a complete cache in a bucket deletes its manifest (uncommitting it) and its
shards when the new run starts, since nothing can be swapped in.

Samples are written in the plan's order and shards end on batch boundaries, so a resumed run
recomputes exactly the batches an uninterrupted run would have computed next.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from ..cache_format import FORMAT, MANIFEST, CachedSample, DataError, ShardWriter, write_manifest
from ..utils import storage
from ..utils.files import atomic_path, move_into_place

JOB = "job.json"
JOB_FORMAT = "qwen-edit-jax/cache-job"
PARTIAL_SUFFIX = ".partial"


class CacheExists(Exception):
    """The output is already a complete cache of this very job (nothing to do)."""


def partial_path(output: str) -> str:
    """Where the job and shard records of an unfinished cache of `output` live (a folder or prefix)."""
    return storage.normalize(output) + PARTIAL_SUFFIX


def _read_json(path: str) -> Any:
    return json.loads(storage.read_text(path))


def _write_json(path: str, data: Any) -> None:
    """`data` as JSON, on disk (or in the bucket) before it takes its name (a record counts only once complete)."""
    if storage.is_remote(path):
        storage.write_text(path, json.dumps(data, indent=1) + "\n")
        return
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def describe_job_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two job records, in words (for the refusal to resume)."""
    parts = []
    for key in sorted(set(old.get("options", {})) | set(new.get("options", {}))):
        a, b = old.get("options", {}).get(key), new.get("options", {}).get(key)
        if a != b:
            parts.append(f"{key} {a!r} -> {b!r}")
    if old.get("model_files") != new.get("model_files"):
        parts.append("the model's files changed")
    a = {s[0]: s for s in old.get("samples", [])}
    b = {s[0]: s for s in new.get("samples", [])}
    if a != b or [s[0] for s in old.get("samples", [])] != [s[0] for s in new.get("samples", [])]:
        gone, added = len(set(a) - set(b)), len(set(b) - set(a))
        changed = sum(1 for k in set(a) & set(b) if a[k] != b[k])
        parts.append(f"samples: {gone} gone, {added} new, {changed} changed (files, prompts or sizes)")
    return "; ".join(parts) or "the job record differs"


def _staging_dir(output: str) -> str:
    """A fresh local folder for the shard being written to the bucket `output`: one name per output, so a rerun
    after a kill clears what the killed run left there."""
    digest = hashlib.sha256(output.encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), f"qwen-edit-jax-cache-{digest}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return folder


class PartialCache:
    """Owns the unfinished cache of `output`: decides at open whether to resume, writes shards, finishes
    (see module doc).

    Only one process writes (process 0 of a multi-host job); the others only read `done`.
    """

    def __init__(self, output: str | os.PathLike, job: dict[str, Any], *, overwrite: bool = False,
                 latent_dtype: Any = np.float32, embed_dtype: Any = None, log=print):
        self.output = storage.check_output(output, "--output")
        self.remote = storage.is_remote(self.output)
        self.partial = partial_path(self.output)
        # shards: written in `staging` (local), counted once in `shard_dir` (the partial folder, or the bucket prefix)
        self.shard_dir = self.output if self.remote else self.partial
        self.job, self.overwrite, self.log = job, overwrite, log
        self.created = False
        self._check_output()
        records: list[dict[str, Any]] = []
        if storage.isdir(self.partial):
            records = self._resume_records()
        if not storage.isdir(self.partial):
            if not self.remote:
                os.makedirs(self.partial)
            self.created = True
            _write_json(storage.join(self.partial, JOB), job)
        self.staging = _staging_dir(self.output) if self.remote else self.partial
        shards = [r["shard"] for r in records]
        entries = [e for r in records for e in r["entries"]]
        channels = records[-1]["latent_channels"] if records else None
        joint = records[-1]["joint_attention_dim"] if records else None
        self.writer = ShardWriter(self.staging, latent_dtype=latent_dtype, embed_dtype=embed_dtype, shards=shards,
                                  entries=entries, latent_channels=channels, joint_attention_dim=joint, fsync=True)
        self.done = len(entries)

    # -- opening
    def _check_output(self) -> None:
        manifest = storage.join(self.output, MANIFEST)
        if not (storage.exists(manifest) if self.remote else os.path.lexists(self.output)):
            if self.remote and storage.isdir(self.output) and not storage.isdir(self.partial):
                raise FileExistsError(f"--output {self.output}: holds objects but no {MANIFEST} and no "
                                      f"{PARTIAL_SUFFIX} records of an unfinished run; choose another prefix")
            return
        try:
            m = _read_json(manifest)
        except (OSError, ValueError):
            m = None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            if os.path.isdir(self.output) and not os.listdir(self.output):
                os.rmdir(self.output)  # an empty folder made by the user: take its place
                return
            raise FileExistsError(f"--output {self.output}: exists and is not a cached dataset (no readable "
                                  f"{MANIFEST}); choose another folder")
        if not self.overwrite:
            if (m.get("metadata") or {}).get("job_fingerprint") == self.job["fingerprint"]:
                raise CacheExists(f"{self.output} is already a complete cache of this dataset and these options "
                                  f"({m.get('num_samples')} samples); nothing to do")
            raise FileExistsError(f"--output {self.output}: a cached dataset made from other inputs or options "
                                  f"exists there; pass --overwrite to replace it")
        if self.remote:  # no rename in a bucket: uncommit the old cache (manifest first), then drop its shards
            self.log(f"--overwrite: deleting the cache at {self.output}")
            storage.as_path(manifest).unlink()
            storage.remove_tree(self.output)

    def _discard(self, reason: str) -> None:
        self.log(f"discarding {self.partial} ({reason}); starting over")
        storage.remove_tree(self.partial)
        if self.remote:  # the shards of that run (no manifest: _check_output saw to it)
            storage.remove_tree(self.output)

    def _resume_records(self) -> list[dict[str, Any]]:
        try:
            old = _read_json(storage.join(self.partial, JOB))
        except (OSError, ValueError):
            old = None
        if self.overwrite or not isinstance(old, dict) or old.get("format") != JOB_FORMAT:
            self._discard("--overwrite" if self.overwrite else "it has no readable job record")
            return []
        if old.get("fingerprint") != self.job["fingerprint"]:
            raise FileExistsError(f"{self.partial}: an interrupted run of a different job is there "
                                  f"({describe_job_change(old, self.job)}); rerun it with its own options to finish "
                                  f"it, or pass --overwrite to start over")
        records: list[dict[str, Any]] = []
        planned = [s[0] for s in self.job["samples"]]
        start = 0
        while True:  # the complete shards, in order, up to the first missing or inconsistent one
            try:
                rec = _read_json(storage.join(self.partial, f"shard-{len(records):05d}.json"))
                shard_file = storage.join(self.shard_dir, rec["shard"]["file"])
                ids = [e["id"] for e in rec["entries"]]
                ok = storage.size(shard_file) == rec["shard"]["bytes"] and ids == planned[start:start + len(ids)]
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                break
            records.append(rec)
            start += len(ids)
        for folder in dict.fromkeys([self.partial, self.shard_dir]):  # anything after the last good record is redone
            for name in storage.listdir(folder):
                stem = name.split(".")[0]
                leftover = name.startswith(".")  # the temporary file of a write that was killed
                if leftover or (stem.startswith("shard-") and int(stem[6:]) >= len(records)):
                    storage.as_path(storage.join(folder, name)).unlink()
        return records

    # -- writing
    def add(self, samples: list[CachedSample]) -> None:
        for s in samples:
            self.writer.add(s)

    @property
    def pending_bytes(self) -> int:
        return self.writer.pending_bytes

    def flush(self) -> None:
        """Write the buffered samples as a shard (uploaded whole to a bucket), then its record (the shard
        counts from then on)."""
        first = len(self.writer.entries) - self.writer.pending_samples
        shard = self.writer.flush()
        if shard is None:
            return
        if self.remote:
            local = os.path.join(self.staging, shard["file"])
            storage.upload_file(local, storage.join(self.shard_dir, shard["file"]))
            os.remove(local)
        index = len(self.writer.shards) - 1
        rec = {"shard": shard, "entries": self.writer.entries[first:], "latent_channels": self.writer.channels,
               "joint_attention_dim": self.writer.joint}
        _write_json(storage.join(self.partial, f"shard-{index:05d}.json"), rec)
        self.done = len(self.writer.entries)

    def finish(self, metadata: dict[str, Any]) -> str:
        """Flush and write the manifest (the commit); then drop the records (local: rename the folder to the
        output; bucket: delete the partial prefix)."""
        self.flush()
        if not self.writer.entries:
            raise DataError(f"{self.output}: no samples to write")
        manifest = self.writer.manifest({**metadata, "job_fingerprint": self.job["fingerprint"]})
        if self.remote:
            write_manifest(self.shard_dir, manifest)
            storage.remove_tree(self.partial)
            shutil.rmtree(self.staging, ignore_errors=True)
            return self.output
        write_manifest(self.partial, manifest)
        for name in os.listdir(self.partial):
            if name.endswith(".json") and name != MANIFEST:
                os.remove(os.path.join(self.partial, name))
        return move_into_place(self.partial, self.output, overwrite=True)

    def abandon(self) -> None:
        """After a failure: remove the partial records (and local staging) if this run made them and finished
        no shard."""
        if self.remote:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.created and not self.writer.shards and storage.isdir(self.partial):
            storage.remove_tree(self.partial)


__all__ = ["CacheExists", "JOB", "JOB_FORMAT", "PartialCache", "describe_job_change", "partial_path"]
