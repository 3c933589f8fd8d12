"""A resumable cache writer: shards land in `OUTPUT.partial/` as they fill; a kill loses at most the
samples of the shard being filled, and the same command resumes after the last complete shard.

`OUTPUT.partial/` holds
* `job.json`: what is being cached (options, model files, every planned sample with its files' sizes
  and modification times): a rerun resumes only when its job is the same;
* `shard-NNNNN.safetensors` + `shard-NNNNN.json`: a shard and its record (the shard's manifest
  entries), the record written (atomically) after the shard is on disk, so a shard counts only
  when its record exists and the sizes agree.
When every sample is written, `manifest.json` is assembled from the records, the records and
`job.json` are removed, and the folder is renamed to `OUTPUT` (the format of `cache_format`).
Samples are written in the plan's order and shards end on batch boundaries, so a resumed run
recomputes exactly the batches an uninterrupted run would have computed next.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from ..cache_format import FORMAT, MANIFEST, CachedSample, DataError, ShardWriter, write_manifest
from ..utils.files import atomic_path, check_output_dir, move_into_place

JOB = "job.json"
JOB_FORMAT = "qwen-edit-jax/cache-job"
PARTIAL_SUFFIX = ".partial"


class CacheExists(Exception):
    """The output is already a complete cache of this very job (nothing to do)."""


def partial_path(output: str) -> str:
    return os.path.abspath(output) + PARTIAL_SUFFIX


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data: Any) -> None:
    """`data` as JSON, on disk before it takes its name (a record counts only once complete)."""
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


class PartialCache:
    """Owns `OUTPUT.partial/`: decides at open whether to resume, writes shards, finishes (see module doc).

    Only one process writes (process 0 of a multi-host job); the others only read `done`.
    """

    def __init__(self, output: str | os.PathLike, job: dict[str, Any], *, overwrite: bool = False,
                 latent_dtype: Any = np.float32, embed_dtype: Any = None, log=print):
        self.output = check_output_dir(output, "--output")
        self.partial = partial_path(self.output)
        self.job, self.overwrite, self.log = job, overwrite, log
        self.created = False
        self._check_output()
        records: list[dict[str, Any]] = []
        if os.path.isdir(self.partial):
            records = self._resume_records()
        if not os.path.isdir(self.partial):
            os.makedirs(self.partial)
            self.created = True
            _write_json(os.path.join(self.partial, JOB), job)
        shards = [r["shard"] for r in records]
        entries = [e for r in records for e in r["entries"]]
        channels = records[-1]["latent_channels"] if records else None
        joint = records[-1]["joint_attention_dim"] if records else None
        self.writer = ShardWriter(self.partial, latent_dtype=latent_dtype, embed_dtype=embed_dtype, shards=shards,
                                  entries=entries, latent_channels=channels, joint_attention_dim=joint, fsync=True)
        self.done = len(entries)

    # -- opening
    def _check_output(self) -> None:
        if not os.path.lexists(self.output):
            return
        manifest = os.path.join(self.output, MANIFEST)
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

    def _resume_records(self) -> list[dict[str, Any]]:
        try:
            old = _read_json(os.path.join(self.partial, JOB))
        except (OSError, ValueError):
            old = None
        if self.overwrite or not isinstance(old, dict) or old.get("format") != JOB_FORMAT:
            reason = "--overwrite" if self.overwrite else "it has no readable job record"
            self.log(f"discarding {self.partial} ({reason}); starting over")
            shutil.rmtree(self.partial)
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
                rec = _read_json(os.path.join(self.partial, f"shard-{len(records):05d}.json"))
                shard_file = os.path.join(self.partial, rec["shard"]["file"])
                ids = [e["id"] for e in rec["entries"]]
                ok = os.path.getsize(shard_file) == rec["shard"]["bytes"] and ids == planned[start:start + len(ids)]
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                break
            records.append(rec)
            start += len(ids)
        for name in os.listdir(self.partial):  # anything after the last good record is redone
            stem = name.split(".")[0]
            leftover = name.startswith(".")  # the temporary file of a write that was killed
            if leftover or (stem.startswith("shard-") and int(stem[6:]) >= len(records)):
                os.remove(os.path.join(self.partial, name))
        return records

    # -- writing
    def add(self, samples: list[CachedSample]) -> None:
        for s in samples:
            self.writer.add(s)

    @property
    def pending_bytes(self) -> int:
        return self.writer.pending_bytes

    def flush(self) -> None:
        """Write the buffered samples as a shard, then its record (the shard counts from then on)."""
        first = len(self.writer.entries) - self.writer.pending_samples
        shard = self.writer.flush()
        if shard is None:
            return
        index = len(self.writer.shards) - 1
        rec = {"shard": shard, "entries": self.writer.entries[first:], "latent_channels": self.writer.channels,
               "joint_attention_dim": self.writer.joint}
        _write_json(os.path.join(self.partial, f"shard-{index:05d}.json"), rec)
        self.done = len(self.writer.entries)

    def finish(self, metadata: dict[str, Any]) -> str:
        """Flush, write the manifest, drop the records and rename the folder to the output."""
        self.flush()
        if not self.writer.entries:
            raise DataError(f"{self.output}: no samples to write")
        write_manifest(self.partial, self.writer.manifest({**metadata, "job_fingerprint": self.job["fingerprint"]}))
        for name in os.listdir(self.partial):
            if name.endswith(".json") and name != MANIFEST:
                os.remove(os.path.join(self.partial, name))
        return move_into_place(self.partial, self.output, overwrite=True)

    def abandon(self) -> None:
        """After a failure: remove the partial folder if this run made it and finished no shard."""
        if self.created and not self.writer.shards and os.path.isdir(self.partial):
            shutil.rmtree(self.partial, ignore_errors=True)


__all__ = ["CacheExists", "JOB", "JOB_FORMAT", "PartialCache", "describe_job_change", "partial_path"]
