"""The training cache's on-disk format: manifest, shard writer and reader (used by `caching`, which
writes caches, and `training`, which reads them).

**Format** (a folder; the contract between caching, training and sampling):

* `manifest.json`: `{"format": "qwen-edit-jax/cached-samples", "version": 1 or 2, "latent_channels": C,
  "joint_attention_dim": J, "num_samples": N, "shards": [{"file", "num_samples", "bytes", "sha256"}],
  "samples": [{"id", "shard", "key", "target": [C, h, w], "references": [[C, h, w], …],
  "prompt_len": L, "negative_prompt_len": L' or null, "crc32", ["mask": true]}], "metadata": {…}}`.
* `shard-NNNNN.safetensors`: per sample `<key>.target` [C, h, w] (normalised VAE latent, h, w = H/8,
  W/8), `<key>.reference.<j>` [C, h_j, w_j], `<key>.prompt_embeds` [L, J], `<key>.prompt_mask` [L]
  (uint8 0/1), optionally `<key>.negative_prompt_embeds` / `<key>.negative_prompt_mask`, and
  `<key>.mask` [h, w] float32 in [0, 1] (the loss weight of each latent pixel of the target; only for
  samples with a mask, whose manifest entry has `"mask": true`). A cache with masks is version 2, so a reader
  that does not know masks refuses it by its version instead of calling it corrupt; a cache without them is
  written exactly as before (version 1), and both versions are read.

The negative prompt is the *empty-prompt* encoding of the sample (with its reference images) when the
manifest's `metadata.negative_prompt` is blank (`" "`, the caching default, or `""`); caption dropout
in training uses it (`CachedDataset.has_empty_prompt`).

`crc32` covers the raw bytes of all of a sample's tensors, so a damaged sample is caught when it is
read (cheap: one pass over a few MB); `sha256` per shard is checked by `CachedDataset.verify()`.
`write_cache` writes the whole folder under a temporary name and renames it when complete;
`ShardWriter` + `write_manifest` are its shard-by-shard parts (`qwen_edit_jax.caching` builds its
resumable writer on them). Shards are written and read through `weights.safetensors_io`.

`CachedDataset` reads a local folder (shards memory-mapped) or a `gs://` prefix: the manifest, then per
shard its header once and afterwards only the byte ranges of the samples asked for, so each host of a
pod fetches its own rows and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np

from .errors import CheckpointError
from .utils import storage
from .utils.files import atomic_path
from .weights.safetensors_io import RangedSafetensorsFile, SafetensorsFile, save_tensors

FORMAT = "qwen-edit-jax/cached-samples"
VERSION = 2  # the newest version written: 2 when some sample has a mask, else 1 (unchanged from before masks)
VERSIONS = (1, 2)  # versions this reader knows
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
    mask: np.ndarray | None = None  # [h, w] float32 in [0, 1]: loss weight per target latent pixel (None: all 1)


# The negative prompts that count as the empty prompt (caption dropout trains on them).
EMPTY_PROMPTS = ("", " ")


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
    has_mask: bool = False

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
    if sample.mask is not None:
        t[f"{key}.mask"] = sample.mask
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
    mask = None
    if sample.mask is not None:
        mask = np.asarray(sample.mask, np.float32)
        if mask.shape != target.shape[1:]:
            raise DataError(f"sample {sid}: mask shape {mask.shape} is not the target latent's {target.shape[1:]}")
        if not np.all((mask >= 0) & (mask <= 1)):  # also false for NaN
            raise DataError(f"sample {sid}: mask values must be in [0, 1]")
        mask = np.ascontiguousarray(mask)
    return CachedSample(sid, target, refs, pe, pm, ne, nm, mask)


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
        if s.mask is not None:
            entry["mask"] = True
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
        save_tensors(fp, self._pending, {"format": FORMAT}, fsync=self.fsync)
        record = {"file": name, "num_samples": self.pending_samples, "bytes": os.path.getsize(fp),
                  "sha256": _sha256(fp)}
        self.shards.append(record)
        self._pending, self.pending_samples, self.pending_bytes = {}, 0, 0
        return record

    def manifest(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest of the shards written so far (call after the last `flush`)."""
        if self.pending_samples:
            raise DataError(f"{self.folder}: {self.pending_samples} samples are not flushed to a shard yet")
        version = 2 if any(e.get("mask") for e in self.entries) else 1
        return {"format": FORMAT, "version": version, "latent_channels": self.channels,
                "joint_attention_dim": self.joint, "num_samples": len(self.entries), "shards": self.shards,
                "samples": self.entries, "metadata": dict(metadata or {})}


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """Write `manifest.json` into `folder`, never half-written (local: temporary name, then renamed; a `gs://`
    prefix: one whole-object upload, which commits the cache there)."""
    return storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=1) + "\n")


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
    with storage.as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---- reading ------------------------------------------------------------------------------------
class CachedDataset:
    """Random access to a cached dataset folder; `ds[i]` → `CachedSample` (checked on read)."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = storage.normalize(path)
        mpath = storage.join(self.path, MANIFEST)
        if not storage.isdir(self.path):
            raise DataError(f"{self.path}: cached dataset folder not found")
        try:
            raw = storage.read_bytes(mpath)
            m = json.loads(raw)
        except FileNotFoundError:
            raise DataError(f"{mpath}: missing; {self.path} is not a complete cached dataset "
                            f"(write one with qwen_edit_jax.cache_format.write_cache)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mpath}: corrupt manifest, not valid JSON ({e})") from None
        self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DataError(f"{mpath}: not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else m!r})")
        if m.get("version") not in VERSIONS:
            raise DataError(f"{mpath}: unsupported version {m.get('version')!r} (this reader knows "
                            f"{', '.join(map(str, VERSIONS))})")
        try:
            self.latent_channels = int(m["latent_channels"])
            self.joint_attention_dim = int(m["joint_attention_dim"])
            self.shards = [dict(s) for s in m["shards"]]
            self.metadata = dict(m.get("metadata") or {})
            self.infos = [
                SampleInfo(i, str(e["id"]), int(e["shard"]), str(e["key"]), tuple(e["target"]),
                           tuple(tuple(r) for r in e["references"]), int(e["prompt_len"]),
                           None if e.get("negative_prompt_len") is None else int(e["negative_prompt_len"]),
                           int(e["crc32"]), bool(e.get("mask", False)))
                for i, e in enumerate(m["samples"])
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{mpath}: corrupt manifest, bad or missing field ({e!r})") from None
        for s in self.shards:
            fp = storage.join(self.path, s["file"])
            try:
                size = storage.size(fp)
            except FileNotFoundError:
                raise DataError(f"{fp}: shard missing from cached dataset {self.path}") from None
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

    @property
    def bytes_fetched(self) -> int:
        """Bytes read from a bucket so far (shard headers and samples; 0 for a local folder)."""
        return sum(getattr(h, "bytes_read", 0) for h in self._handles.values())

    @property
    def has_masks(self) -> bool:
        """Some sample has a loss mask."""
        return any(i.has_mask for i in self.infos)

    @property
    def has_empty_prompt(self) -> bool:
        """Every sample's negative prompt is the empty prompt's encoding (with its images): blank
        `metadata.negative_prompt` and a cached negative prompt for every sample."""
        return (self.metadata.get("negative_prompt") in EMPTY_PROMPTS
                and all(i.negative_prompt_len is not None for i in self.infos))

    def verify(self, progress: bool = False) -> None:
        """Check every shard's sha256 against the manifest."""
        shards = self.shards
        if progress:
            from tqdm.auto import tqdm

            shards = tqdm(shards, desc="verify cache", unit="shard")
        for s in shards:
            fp = storage.join(self.path, s["file"])
            if _sha256(fp) != s["sha256"]:
                raise DataError(f"{fp}: sha256 mismatch, the shard is corrupt")

    def _handle(self, shard: int) -> SafetensorsFile | RangedSafetensorsFile:
        """The shard's reader: memory-mapped (a local folder) or by byte ranges (`gs://`: the header once,
        then each sample's bytes only)."""
        h = self._handles.get(shard)
        if h is None:
            fp = storage.join(self.path, self.shards[shard]["file"])
            try:
                h = RangedSafetensorsFile(fp) if storage.is_remote(fp) else SafetensorsFile(fp)
            except CheckpointError as e:
                if not storage.exists(fp):
                    raise DataError(f"{fp}: shard missing from cached dataset {self.path}") from None
                raise DataError(f"{fp}: corrupt shard, not a readable safetensors file ({e})") from None
            self._handles[shard] = h
        return h

    def __getitem__(self, i: int) -> CachedSample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        info = self.infos[i]
        fp = storage.join(self.path, self.shards[info.shard]["file"])
        where = f"sample {info.sample_id} (#{info.index}) in {fp}"
        names = [f"{info.key}.target", *(f"{info.key}.reference.{j}" for j in range(len(info.reference_shapes))),
                 f"{info.key}.prompt_embeds", f"{info.key}.prompt_mask"]
        if info.negative_prompt_len is not None:
            names += [f"{info.key}.negative_prompt_embeds", f"{info.key}.negative_prompt_mask"]
        if info.has_mask:
            names.append(f"{info.key}.mask")
        with self._lock:
            h = self._handle(info.shard)
            missing = [n for n in names if n not in h]
            if missing:
                raise DataError(f"{where}: cannot read tensor {missing[0]} (not in the shard)")
            try:
                arrays = h.read_many(names)
            except Exception as e:  # unreadable data
                raise DataError(f"{where}: cannot read tensors {', '.join(names)} ({e})") from None
        if _crc(arrays) != info.crc32:
            raise DataError(f"{where}: checksum mismatch, the sample's data is corrupt")
        target, refs = arrays[0], arrays[1:1 + len(info.reference_shapes)]
        rest = arrays[1 + len(info.reference_shapes):]
        mask = rest.pop() if info.has_mask else None
        if mask is not None and tuple(mask.shape) != tuple(info.target_shape[1:]):
            raise DataError(f"{where}: tensor {info.key}.mask has shape {mask.shape}, the target is "
                            f"{tuple(info.target_shape[1:])}")
        expect = [info.target_shape, *info.reference_shapes]
        for a, shape, n in zip([target, *refs], expect, names):
            if tuple(a.shape) != tuple(shape):
                raise DataError(f"{where}: tensor {n} has shape {a.shape}, the manifest says {tuple(shape)}")
        if rest[0].shape[0] != info.prompt_len:
            raise DataError(f"{where}: prompt_embeds has {rest[0].shape[0]} tokens, the manifest says {info.prompt_len}")
        neg = (rest[2], rest[3].astype(bool)) if len(rest) == 4 else (None, None)
        return CachedSample(info.sample_id, target, list(refs), rest[0], rest[1].astype(bool), *neg, mask)


__all__ = ["DEFAULT_SHARD_BYTES", "EMPTY_PROMPTS", "FORMAT", "MANIFEST", "VERSION", "VERSIONS", "CachedDataset", "CachedSample",
           "DataError", "ImgShapes", "SampleInfo", "ShardWriter", "write_cache", "write_manifest"]
