"""Cached training samples: the on-disk format, its reader, and the bucketed, host-split batch loader.

**Format** (a folder; the contract between caching, training and sampling):

* `manifest.json`: `{"format": "qwen-edit-jax/cached-samples", "version": 1, "latent_channels": C,
  "joint_attention_dim": J, "shards": [{"file", "num_samples", "bytes", "sha256"}],
  "samples": [{"id", "shard", "key", "target": [C, h, w], "references": [[C, h, w], …],
  "prompt_len": L, "negative_prompt_len": L' or null, "crc32"}], "metadata": {…}}`.
* `shard-NNNNN.safetensors`: per sample `<key>.target` [C, h, w] (normalised VAE latent, h, w = H/8,
  W/8), `<key>.reference.<j>` [C, h_j, w_j], `<key>.prompt_embeds` [L, J], `<key>.prompt_mask` [L]
  (uint8 0/1), optionally `<key>.negative_prompt_embeds` / `<key>.negative_prompt_mask`.

`crc32` covers the raw bytes of all of a sample's tensors, so a damaged sample is caught when it is
read (cheap: one pass over a few MB); `sha256` per shard is checked by `CachedDataset.verify()`.
`write_cache` writes the whole folder under a temporary name and renames it when complete;
`ShardWriter` + `write_manifest` are its shard-by-shard parts (`qwen_edit_jax.caching` builds its
resumable writer on them).

**Loading**: samples are grouped by image layout (target size + reference sizes) and by text
bucket (prompt length padded up to one of a few lengths, with a mask), so XLA compiles one program
per bucket. Each epoch shuffles within buckets and the order of batches (seeded by (seed, epoch)),
every host computes the same global plan and reads only its rows (`process_index`), and the
position (epoch, batch) is part of the training checkpoint.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..packing import pack_latents
from ..utils.files import atomic_path, default_mode

FORMAT = "qwen-edit-jax/cached-samples"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 512 * 1024**2

ImgShapes = tuple[tuple[int, int, int], ...]


class DataError(ValueError):
    """A cached dataset, shard or sample is missing, corrupt or unusable; the message names it."""


@dataclasses.dataclass
class CachedSample:
    """One training example, as cached (numpy, unpacked latents)."""

    sample_id: str
    target: np.ndarray  # [C, h, w] normalised VAE latent of the edited image; h, w = H/8, W/8 (even)
    references: list[np.ndarray]  # [C, h_k, w_k] per reference image (any number, may be empty)
    prompt_embeds: np.ndarray  # [L, joint_attention_dim] text-encoder hidden states
    prompt_mask: np.ndarray  # [L] bool, True = real token
    negative_prompt_embeds: np.ndarray | None = None
    negative_prompt_mask: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SampleInfo:
    """A manifest entry: where a sample lives and its shapes (known without reading tensors)."""

    index: int
    sample_id: str
    shard: int
    key: str
    target_shape: tuple[int, int, int]
    reference_shapes: tuple[tuple[int, int, int], ...]
    prompt_len: int
    negative_prompt_len: int | None
    crc32: int

    @property
    def img_shapes(self) -> ImgShapes:
        """(1, h/2, w/2) token grids: target first, then each reference (the model's `img_shapes`)."""
        return tuple((1, s[1] // 2, s[2] // 2) for s in (self.target_shape, *self.reference_shapes))


# ---- writing ------------------------------------------------------------------------------------
def _tensors_of(sample: CachedSample, key: str) -> dict[str, np.ndarray]:
    t = {f"{key}.target": sample.target}
    for j, r in enumerate(sample.references):
        t[f"{key}.reference.{j}"] = r
    t[f"{key}.prompt_embeds"] = sample.prompt_embeds
    t[f"{key}.prompt_mask"] = sample.prompt_mask
    if sample.negative_prompt_embeds is not None:
        t[f"{key}.negative_prompt_embeds"] = sample.negative_prompt_embeds
        t[f"{key}.negative_prompt_mask"] = sample.negative_prompt_mask
    return t


def _crc(tensors: Iterable[np.ndarray]) -> int:
    c = 0
    for a in tensors:
        c = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), c)
    return c & 0xFFFFFFFF


def _prepare(sample: CachedSample, channels: int | None, joint: int | None, latent_dtype: Any,
             embed_dtype: Any) -> CachedSample:
    """Validate one sample and cast it to the storage dtypes; errors name the sample."""
    sid = sample.sample_id
    if not isinstance(sid, str) or not sid:
        raise DataError(f"sample id must be a non-empty string, got {sid!r}")

    def latent(a: Any, what: str) -> np.ndarray:
        a = np.asarray(a)
        if a.ndim != 3 or a.shape[1] % 2 or a.shape[2] % 2 or min(a.shape) == 0:
            raise DataError(f"sample {sid}: {what} must be [C, h, w] with even h and w, got {a.shape}")
        if channels is not None and a.shape[0] != channels:
            raise DataError(f"sample {sid}: {what} has {a.shape[0]} channels, the dataset has {channels}")
        if not np.all(np.isfinite(a.astype(np.float32))):
            raise DataError(f"sample {sid}: {what} contains NaN or Inf")
        return np.ascontiguousarray(a.astype(latent_dtype))

    def text(e: Any, m: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        e = np.asarray(e)
        if e.ndim != 2 or e.shape[0] == 0:
            raise DataError(f"sample {sid}: {what}_embeds must be [L, J] with L >= 1, got {e.shape}")
        if joint is not None and e.shape[1] != joint:
            raise DataError(f"sample {sid}: {what}_embeds width {e.shape[1]}, the dataset has {joint}")
        if not np.all(np.isfinite(e.astype(np.float32))):
            raise DataError(f"sample {sid}: {what}_embeds contains NaN or Inf")
        m = np.ones(e.shape[0], bool) if m is None else np.asarray(m)
        if m.shape != (e.shape[0],):
            raise DataError(f"sample {sid}: {what}_mask shape {m.shape} does not match {what}_embeds {e.shape}")
        if not m.astype(bool).any():
            raise DataError(f"sample {sid}: {what}_mask has no real token")
        return np.ascontiguousarray(e.astype(embed_dtype or e.dtype)), m.astype(bool).astype(np.uint8)

    target = latent(sample.target, "target")
    channels = target.shape[0]
    refs = [latent(r, f"reference {j}") for j, r in enumerate(sample.references or [])]
    pe, pm = text(sample.prompt_embeds, sample.prompt_mask, "prompt")
    joint = pe.shape[1]
    ne = nm = None
    if sample.negative_prompt_embeds is None and sample.negative_prompt_mask is not None:
        raise DataError(f"sample {sid}: negative_prompt_mask given without negative_prompt_embeds")
    if sample.negative_prompt_embeds is not None:
        ne, nm = text(sample.negative_prompt_embeds, sample.negative_prompt_mask, "negative_prompt")
    return CachedSample(sid, target, refs, pe, pm, ne, nm)


class ShardWriter:
    """Appends checked samples to numbered shards in `folder`: the building block of `write_cache`
    and of resumable writers (`qwen_edit_jax.caching`), which restart from the records of the shards
    already written (`shards`, `entries`, and the dataset's `latent_channels` / `joint_attention_dim`).

    `add` checks and buffers one sample; `flush` writes the buffer as the next shard and returns its
    record (`{"file", "num_samples", "bytes", "sha256"}`); `manifest` is the complete manifest dict.
    """

    def __init__(self, folder: str | os.PathLike, *, latent_dtype: Any = np.float32, embed_dtype: Any = None,
                 shards: Sequence[dict[str, Any]] = (), entries: Sequence[dict[str, Any]] = (),
                 latent_channels: int | None = None, joint_attention_dim: int | None = None, fsync: bool = False):
        self.folder = os.fspath(folder)
        self.latent_dtype, self.embed_dtype, self.fsync = latent_dtype, embed_dtype, fsync
        self.shards = [dict(s) for s in shards]
        self.entries = [dict(e) for e in entries]
        self.channels, self.joint = latent_channels, joint_attention_dim
        self._seen = {e["id"] for e in self.entries}
        self._pending: dict[str, np.ndarray] = {}
        self.pending_samples = self.pending_bytes = 0

    def add(self, sample: CachedSample) -> dict[str, Any]:
        """Check `sample`, cast it to the storage dtypes and buffer it; returns its manifest entry."""
        s = _prepare(sample, self.channels, self.joint, self.latent_dtype, self.embed_dtype)
        if s.sample_id in self._seen:
            raise DataError(f"duplicate sample id {s.sample_id!r}")
        self._seen.add(s.sample_id)
        self.channels, self.joint = s.target.shape[0], s.prompt_embeds.shape[1]
        key = f"{len(self.entries):08d}"
        tensors = _tensors_of(s, key)
        entry = {
            "id": s.sample_id, "shard": len(self.shards), "key": key,
            "target": list(s.target.shape), "references": [list(r.shape) for r in s.references],
            "prompt_len": int(s.prompt_embeds.shape[0]),
            "negative_prompt_len": None if s.negative_prompt_embeds is None
            else int(s.negative_prompt_embeds.shape[0]),
            "crc32": _crc(tensors.values()),
        }
        self.entries.append(entry)
        self._pending.update(tensors)
        self.pending_samples += 1
        self.pending_bytes += sum(a.nbytes for a in tensors.values())
        return entry

    def flush(self) -> dict[str, Any] | None:
        """Write the buffered samples as the next shard; returns its record (None if nothing is buffered)."""
        if not self.pending_samples:
            return None
        name = f"shard-{len(self.shards):05d}.safetensors"
        fp = os.path.join(self.folder, name)
        save_file(self._pending, fp, metadata={"format": FORMAT})
        default_mode(fp)  # safetensors writes 0o600; a cache is usually shared
        if self.fsync:
            with open(fp, "rb") as f:
                os.fsync(f.fileno())
        record = {"file": name, "num_samples": self.pending_samples, "bytes": os.path.getsize(fp),
                  "sha256": _sha256(fp)}
        self.shards.append(record)
        self._pending, self.pending_samples, self.pending_bytes = {}, 0, 0
        return record

    def manifest(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest of the shards written so far (call after the last `flush`)."""
        if self.pending_samples:
            raise DataError(f"{self.folder}: {self.pending_samples} samples are not flushed to a shard yet")
        return {"format": FORMAT, "version": VERSION, "latent_channels": self.channels,
                "joint_attention_dim": self.joint, "num_samples": len(self.entries), "shards": self.shards,
                "samples": self.entries, "metadata": dict(metadata or {})}


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """Write `manifest.json` into `folder` (temporary name, then renamed: never half-written)."""
    path = os.path.join(os.fspath(folder), MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def write_cache(
    path: str | os.PathLike,
    samples: Iterable[CachedSample],
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    latent_dtype: Any = np.float32,
    embed_dtype: Any = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Write `samples` as a cached dataset folder (shards + manifest), atomically.

    `latent_dtype` is the storage dtype of target/reference latents (float32 default);
    `embed_dtype` of prompt embeddings (default: as given, e.g. bfloat16 from the text encoder).
    """
    path = os.fspath(path)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="write cache", unit="sample")
    with atomic_path(path, overwrite=overwrite, is_dir=True) as tmp:
        writer = ShardWriter(tmp, latent_dtype=latent_dtype, embed_dtype=embed_dtype)
        for sample in samples:
            writer.add(sample)
            if writer.pending_bytes >= shard_bytes:
                writer.flush()
            if bar is not None:
                bar.update()
        writer.flush()
        if not writer.entries:
            raise DataError(f"{path}: no samples to write")
        write_manifest(tmp, writer.manifest(metadata))
    if bar is not None:
        bar.close()
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---- reading ------------------------------------------------------------------------------------
class CachedDataset:
    """Random access to a cached dataset folder; `ds[i]` → `CachedSample` (checked on read)."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        mpath = os.path.join(self.path, MANIFEST)
        if not os.path.isdir(self.path):
            raise DataError(f"{self.path}: cached dataset folder not found")
        try:
            with open(mpath, "rb") as f:
                raw = f.read()
            m = json.loads(raw)
        except FileNotFoundError:
            raise DataError(f"{mpath}: missing; {self.path} is not a complete cached dataset "
                            f"(write one with qwen_edit_jax.training.data.write_cache)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mpath}: corrupt manifest, not valid JSON ({e})") from None
        self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DataError(f"{mpath}: not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else m!r})")
        if m.get("version") != VERSION:
            raise DataError(f"{mpath}: unsupported version {m.get('version')!r} (this reader knows {VERSION})")
        try:
            self.latent_channels = int(m["latent_channels"])
            self.joint_attention_dim = int(m["joint_attention_dim"])
            self.shards = [dict(s) for s in m["shards"]]
            self.metadata = dict(m.get("metadata") or {})
            self.infos = [
                SampleInfo(i, str(e["id"]), int(e["shard"]), str(e["key"]), tuple(e["target"]),
                           tuple(tuple(r) for r in e["references"]), int(e["prompt_len"]),
                           None if e.get("negative_prompt_len") is None else int(e["negative_prompt_len"]),
                           int(e["crc32"]))
                for i, e in enumerate(m["samples"])
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{mpath}: corrupt manifest, bad or missing field ({e!r})") from None
        for s in self.shards:
            fp = os.path.join(self.path, s["file"])
            if not os.path.exists(fp):
                raise DataError(f"{fp}: shard missing from cached dataset {self.path}")
            size = os.path.getsize(fp)
            if size != s["bytes"]:
                raise DataError(f"{fp}: shard is {size} bytes, the manifest says {s['bytes']} (truncated or replaced)")
        for info in self.infos:
            if not 0 <= info.shard < len(self.shards):
                raise DataError(f"{mpath}: sample {info.sample_id} refers to shard {info.shard}, "
                                f"but there are {len(self.shards)}")
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()
        if verify:
            self.verify()

    def __len__(self) -> int:
        return len(self.infos)

    def verify(self, progress: bool = False) -> None:
        """Check every shard's sha256 against the manifest."""
        shards = self.shards
        if progress:
            from tqdm.auto import tqdm

            shards = tqdm(shards, desc="verify cache", unit="shard")
        for s in shards:
            fp = os.path.join(self.path, s["file"])
            if _sha256(fp) != s["sha256"]:
                raise DataError(f"{fp}: sha256 mismatch, the shard is corrupt")

    def _handle(self, shard: int):
        h = self._handles.get(shard)
        if h is None:
            fp = os.path.join(self.path, self.shards[shard]["file"])
            try:
                h = safe_open(fp, framework="numpy")
            except FileNotFoundError:
                raise DataError(f"{fp}: shard missing from cached dataset {self.path}") from None
            except Exception as e:  # SafetensorError for a damaged header
                raise DataError(f"{fp}: corrupt shard, not a readable safetensors file ({e})") from None
            self._handles[shard] = h
        return h

    def __getitem__(self, i: int) -> CachedSample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        info = self.infos[i]
        fp = os.path.join(self.path, self.shards[info.shard]["file"])
        where = f"sample {info.sample_id} (#{info.index}) in {fp}"
        names = [f"{info.key}.target", *(f"{info.key}.reference.{j}" for j in range(len(info.reference_shapes))),
                 f"{info.key}.prompt_embeds", f"{info.key}.prompt_mask"]
        if info.negative_prompt_len is not None:
            names += [f"{info.key}.negative_prompt_embeds", f"{info.key}.negative_prompt_mask"]
        with self._lock:
            h = self._handle(info.shard)
            arrays = []
            for n in names:
                try:
                    arrays.append(h.get_tensor(n))
                except Exception as e:  # missing key or unreadable data
                    raise DataError(f"{where}: cannot read tensor {n} ({e})") from None
        if _crc(arrays) != info.crc32:
            raise DataError(f"{where}: checksum mismatch, the sample's data is corrupt")
        target, refs = arrays[0], arrays[1:1 + len(info.reference_shapes)]
        rest = arrays[1 + len(info.reference_shapes):]
        expect = [info.target_shape, *info.reference_shapes]
        for a, shape, n in zip([target, *refs], expect, names):
            if tuple(a.shape) != tuple(shape):
                raise DataError(f"{where}: tensor {n} has shape {a.shape}, the manifest says {tuple(shape)}")
        if rest[0].shape[0] != info.prompt_len:
            raise DataError(f"{where}: prompt_embeds has {rest[0].shape[0]} tokens, the manifest says {info.prompt_len}")
        neg = (rest[2], rest[3].astype(bool)) if len(rest) == 4 else (None, None)
        return CachedSample(info.sample_id, target, list(refs), rest[0], rest[1].astype(bool), *neg)


# ---- batching -----------------------------------------------------------------------------------
def text_bucket(length: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket >= length (None if the prompt is longer than every bucket)."""
    fits = [b for b in sorted(buckets) if b >= length]
    return fits[0] if fits else None


BucketKey = tuple[ImgShapes, int]


@dataclasses.dataclass
class Batch:
    """One optimizer step's data on this host: arrays [grad_accum, local_batch, ...] + static layout."""

    img_shapes: ImgShapes
    arrays: dict[str, np.ndarray]
    sample_ids: list[str]
    epoch: int
    position: int

    @property
    def key(self) -> BucketKey:
        return self.img_shapes, int(self.arrays["prompt_mask"].shape[-1])


def collate(samples: Sequence[CachedSample], text_len: int) -> dict[str, np.ndarray]:
    """Pack latents to tokens and pad prompts to `text_len`: `target` [B, N, 4C], `references`
    [B, M, 4C] (all references concatenated in order), `prompt_embeds` [B, L, J], `prompt_mask` [B, L]."""
    target = pack_latents(np.stack([np.asarray(s.target, np.float32) for s in samples]))
    refs = [np.concatenate([pack_latents(np.asarray(r, np.float32)[None]) for r in s.references], axis=1)
            if s.references else np.zeros((1, 0, target.shape[-1]), np.float32) for s in samples]
    j = samples[0].prompt_embeds.shape[1]
    embeds = np.zeros((len(samples), text_len, j), np.float32)
    mask = np.zeros((len(samples), text_len), bool)
    for b, s in enumerate(samples):
        n = s.prompt_embeds.shape[0]
        embeds[b, :n] = s.prompt_embeds.astype(np.float32)
        mask[b, :n] = s.prompt_mask
    return {"target": target, "references": np.concatenate(refs, axis=0), "prompt_embeds": embeds,
            "prompt_mask": mask}


class BatchLoader:
    """Endless, deterministic, resumable iterator of `Batch`es for the training loop.

    One step takes `batch_size × grad_accum` samples of one bucket (global, all hosts); this host
    reads only `local_rows` of each micro-batch (default: the contiguous block
    `[process_index·b, (process_index+1)·b)`, b = batch_size / process_count; with a mesh, pass
    `distributed.local_batch_rows(batch_sharding, batch_size)`). Buckets with fewer samples than
    one step are skipped (reported in `skipped`).
    """

    def __init__(
        self,
        dataset: CachedDataset,
        *,
        batch_size: int,
        grad_accum: int = 1,
        text_buckets: Sequence[int] = (64, 128, 256, 512, 1024),
        shuffle: bool = True,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        local_rows: Sequence[int] | None = None,
        prefetch: int = 2,
    ):
        if local_rows is None:
            if batch_size % process_count:
                raise DataError(f"data.batch_size={batch_size} is not divisible by the {process_count} hosts")
            b = batch_size // process_count
            local_rows = range(process_index * b, (process_index + 1) * b)
        self.local_rows = np.asarray(list(local_rows), np.int64)
        if not len(self.local_rows) or self.local_rows.min() < 0 or self.local_rows.max() >= batch_size:
            raise DataError(f"local_rows {self.local_rows.tolist()} do not select rows of a batch of {batch_size}")
        self.dataset, self.batch_size, self.grad_accum = dataset, batch_size, grad_accum
        self.shuffle, self.seed = shuffle, seed
        self.per_step = batch_size * grad_accum
        buckets: dict[BucketKey, list[int]] = collections.defaultdict(list)
        self._text_lens: list[int] = []
        for info in dataset.infos:
            tb = text_bucket(info.prompt_len, text_buckets)
            if tb is None:
                raise DataError(f"{dataset.path}: sample {info.sample_id} has {info.prompt_len} prompt tokens, "
                                f"more than the largest data.text_buckets entry {max(text_buckets)}; add a larger "
                                f"bucket")
            buckets[(info.img_shapes, tb)].append(info.index)
            self._text_lens.append(tb)
        self.buckets = dict(sorted(buckets.items()))
        self.skipped = {k: len(v) for k, v in self.buckets.items() if len(v) < self.per_step}
        self.steps_per_epoch = sum(len(v) // self.per_step for v in self.buckets.values())
        if self.steps_per_epoch == 0:
            sizes = {f"{list(map(list, k[0]))} text {k[1]}": len(v) for k, v in self.buckets.items()}
            raise DataError(f"{dataset.path}: no bucket holds one step's {self.per_step} samples "
                            f"(batch_size {batch_size} x grad_accum {grad_accum}); bucket sizes: {sizes}")
        self.epoch, self.position = 0, 0
        self._plan_epoch: int | None = None
        self._plan: list[np.ndarray] = []
        self._prefetch = prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "cache-loader") if prefetch > 0 else None
        self._ahead: collections.deque = collections.deque()

    # -- plan
    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """Global sample indices of each step of `epoch` (same on every host)."""
        rng = np.random.default_rng([self.seed, epoch])
        steps = []
        for idx in self.buckets.values():
            idx = np.asarray(idx)
            if self.shuffle:
                idx = rng.permutation(idx)
            for j in range(len(idx) // self.per_step):
                steps.append(idx[j * self.per_step:(j + 1) * self.per_step])
        if self.shuffle:
            steps = [steps[o] for o in rng.permutation(len(steps))]
        return steps

    def _indices(self, epoch: int, position: int) -> np.ndarray:
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.epoch_plan(epoch), epoch
        return self._plan[position]

    def _advance(self, epoch: int, position: int) -> tuple[int, int]:
        position += 1
        return (epoch + 1, 0) if position >= self.steps_per_epoch else (epoch, position)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "fingerprint": self.dataset.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") not in (None, self.dataset.fingerprint):
            raise DataError(f"{self.dataset.path}: the checkpoint was trained on a different cached dataset "
                            f"(fingerprint {state.get('fingerprint')} != {self.dataset.fingerprint}); "
                            f"use a new output directory")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self._ahead.clear()

    # -- loading
    def load(self, epoch: int, position: int) -> Batch:
        """Read and collate the step at (epoch, position) for this host."""
        idx = self._indices(epoch, position)
        a, b = self.grad_accum, self.batch_size
        rows = idx.reshape(a, b)[:, self.local_rows]
        infos = [self.dataset.infos[i] for i in rows.reshape(-1)]
        img_shapes = infos[0].img_shapes
        micro = []
        for r in rows:
            samples = [self.dataset[int(i)] for i in r]
            micro.append(collate(samples, self._text_lens[int(r[0])]))
        arrays = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        return Batch(img_shapes, arrays, [i.sample_id for i in infos], epoch, position)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        pos = (self.epoch, self.position)
        if self._pool is None:
            batch = self.load(*pos)
        else:
            if not self._ahead or self._ahead[0][0] != pos:
                self._ahead.clear()
                self._ahead.append((pos, self._pool.submit(self.load, *pos)))
            batch = self._ahead.popleft()[1].result()
        self.epoch, self.position = self._advance(*pos)
        if self._pool is not None:
            nxt = self._ahead[-1][0] if self._ahead else pos
            while len(self._ahead) < self._prefetch:
                nxt = self._advance(*nxt)
                self._ahead.append((nxt, self._pool.submit(self.load, *nxt)))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
