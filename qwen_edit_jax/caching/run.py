"""Dataset → training cache: read the layout, validate every file, plan, encode in batches, write resumably.

    result = cache_dataset("my_pairs/", "cache/", "Qwen-Image-Edit-2509", CacheOptions(resolution=1024))

Steps (`train/cache_dataset.py` is the command line):
1. `layouts.read_dataset` lists the samples; `validate.validate` decodes every image and reads every
   caption before any model is loaded. Bad inputs stop the job (`BadInput`) unless `skip_bad`.
2. The plan orders the good samples by image layout (target size + reference sizes, dataset order
   within a layout) and cuts each layout into batches of `batch_size`, so every VAE call sees one
   image size and each size compiles once per batch-size bucket.
3. Per batch, on a background thread: images decoded and resized (`buckets`), prompts templated and
   tokenised with their reference images (`QwenPromptEncoder.prepare`). On the devices: the VAE
   encodes the target and references (all images of one size in one call), the text encoder the
   prompts and the negative prompt, both split over the mesh's batch axes on every host.
4. `writer.PartialCache` appends samples to shards in `OUTPUT.partial/` and renames it to `OUTPUT`
   when complete; a killed run resumes after its last complete shard. `OUTPUT` may be a `gs://` prefix
   (shards uploaded as they fill, `manifest.json` last as the commit marker; see `writer`).

The negative prompt is encoded per sample *with that sample's reference images*, as the edit
pipelines do for true CFG (`negative_prompt_embeds` depend on the images), and stored in the
cache's `negative_prompt_embeds` (used by sampling/validation; when it is blank, the default " ",
it is the empty prompt that `data.caption_dropout` trains on). A sample's loss mask (`mask/` by
stem, or a metadata `mask`) is resized like its target and averaged onto the latent grid
(`imaging.latent_mask`), cached as `<key>.mask`.
Multi-host: every process runs the same plan and the same SPMD programs on the global mesh and
reads all images of each batch; process 0 alone writes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ..cache_format import DEFAULT_SHARD_BYTES, MANIFEST, CachedSample
from ..config import as_dtype
from ..encoding import QwenPromptEncoder
from ..errors import CheckpointError
from ..imaging import EDIT_VARIANTS, latent_mask, vae_pixels
from ..loading import load_text_encoder, load_vae
from ..loading.vae import QwenImageVAE
from ..models.text_encoder import ENCODER_QUANT_MODES
from ..parallel import distributed
from ..pipeline import VARIANT_OF_CLASS, model_index_class
from ..preprocess import bucket_length
from ..utils import storage
from .buckets import Sizing
from .layouts import LayoutError, Listing, read_dataset
from .validate import GoodSample, Report, format_report, load_image, load_mask, parse_background, validate
from .writer import JOB_FORMAT, CacheExists, PartialCache, partial_path

JOB_VERSION = 1


class BadInput(ValueError):
    """The dataset has bad files and `skip_bad` is off (or nothing good is left); `report` lists them."""

    def __init__(self, message: str, report: Report | None = None):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    """Everything that decides what is cached and how (command-line flags of the same names)."""

    resolution: int | tuple[int, ...] = 1024  # several: every sample cached at each, ids `<id>@<resolution>`
    upscale: bool = False
    control_resolution: str | int = "pipeline"
    batch_size: int = 4
    negative_prompt: str | None = " "  # None: no negative prompt cached
    dtype: str = "bfloat16"  # encoders' weights and activations
    alpha_background: str | None = None
    allow_empty_prompt: bool = False
    allow_no_reference: bool = False  # a sample without a reference image is a text-to-image pair
    skip_bad: bool = False
    caption_ext: str = ".txt"
    layout: str = "auto"
    control_dirs: tuple[str, ...] = ()
    variant: str | None = None  # None: from the repo's model_index.json
    shard_bytes: int = DEFAULT_SHARD_BYTES
    attention: str | None = None  # the vision tower's kernel (None: the loader's default)
    overwrite: bool = False
    progress: bool = True
    workers: int | None = None  # image-decoding threads
    quantize: str | None = None  # the text encoder's large kernels as int8 / fp8 (EncoderOptions.quantize)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.shard_bytes < 1:
            raise ValueError(f"--shard-mb: must be positive, got {self.shard_bytes} bytes")
        if self.variant is not None and self.variant not in EDIT_VARIANTS:
            raise ValueError(f"--variant {self.variant!r}: expected one of {', '.join(EDIT_VARIANTS)}")
        if not self.caption_ext.startswith("."):
            raise ValueError(f"--caption-ext {self.caption_ext!r}: must start with '.' (e.g. .txt)")
        if not isinstance(self.resolution, int) and (not self.resolution or len(set(self.resolution)) !=
                                                      len(self.resolution)):
            raise ValueError(f"--resolution {self.resolution!r}: one or more distinct resolutions")
        self.sizings  # noqa: B018 (validates resolution / control_resolution)
        as_dtype(self.dtype)
        parse_background(self.alpha_background)
        if self.quantize is not None and self.quantize not in ENCODER_QUANT_MODES:
            raise ValueError(f"--quantize {self.quantize!r}: expected one of {', '.join(ENCODER_QUANT_MODES)}")

    @property
    def resolutions(self) -> tuple[int, ...]:
        return (self.resolution,) if isinstance(self.resolution, int) else tuple(self.resolution)

    @property
    def sizings(self) -> tuple[Sizing, ...]:
        """One `Sizing` per resolution (`validate` caches every sample at each)."""
        return tuple(Sizing(r, self.upscale, self.control_resolution) for r in self.resolutions)

    @property
    def sizing(self) -> Sizing:
        """The first resolution's sizing."""
        return self.sizings[0]


@dataclasses.dataclass
class CacheResult:
    output: str
    samples: int  # in the finished cache
    encoded: int  # by this run (the rest was resumed)
    resumed_from: int
    report: Report
    seconds: float
    already_complete: bool = False
    prompt_lengths: tuple[int, int] = (0, 0)  # shortest, longest prompt (tokens): data.text_buckets must reach it


# ---- the model repo ----------------------------------------------------------------------------------
def read_variant(repo: str) -> str:
    """'edit' or 'edit_plus' from the repo's `model_index.json` (`_class_name`), with the CLI's hints."""
    if not os.path.exists(os.path.join(repo, "model_index.json")):
        raise FileNotFoundError(f"--model {repo}: no model_index.json (a diffusers Qwen-Image-Edit folder has one); "
                                f"pass --variant edit or edit_plus to say which pipeline it is")
    try:
        path, name = model_index_class(repo)
    except CheckpointError as e:
        raise ValueError(f"{e} (not a readable diffusers model_index.json)") from None
    if name not in VARIANT_OF_CLASS:
        what = "text-to-image" if name == "QwenImagePipeline" else "not an edit pipeline"
        raise ValueError(f"{path}: _class_name {name!r} is {what}; this command caches edit datasets for "
                         f"{' / '.join(VARIANT_OF_CLASS)} (Qwen-Image-Edit, -2509, -2511)")
    return VARIANT_OF_CLASS[name]


def check_repo(repo: str) -> None:
    """The folders caching reads exist (checked before the dataset is validated)."""
    if not os.path.isdir(repo):
        raise FileNotFoundError(f"--model {repo}: not a folder (expected a diffusers Qwen-Image-Edit repo)")
    for sub in ("vae/config.json", "text_encoder/config.json", "processor"):
        if not os.path.exists(os.path.join(repo, sub)):
            raise FileNotFoundError(f"--model {repo}: {sub} not found (caching needs the repo's vae/, "
                                    f"text_encoder/ and processor/)")


def model_files(repo: str) -> dict[str, list[int]]:
    """{path: [size, mtime_ns]} of the files caching reads (part of the job record)."""
    out = {}
    for sub in ("model_index.json", "vae", "text_encoder", "processor", "tokenizer"):
        top = os.path.join(repo, sub)
        for dirpath, _, files in os.walk(top) if os.path.isdir(top) else [(repo, [], [sub])]:
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                if os.path.isfile(p):
                    st = os.stat(p)
                    out[os.path.relpath(p, repo)] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(out.items()))


# ---- plan --------------------------------------------------------------------------------------------
def order_samples(good: Sequence[GoodSample]) -> list[GoodSample]:
    """Group by image layout (sorted), dataset order within a layout."""
    return sorted(good, key=lambda g: g.layout)


def plan_batches(samples: Sequence[GoodSample], batch_size: int, start: int = 0) -> list[range]:
    """Index ranges of the batches from sample `start` on: chunks of `batch_size` within each layout run,
    counted from the run's first sample (or `start`), so a resumed plan repeats an uninterrupted one."""
    batches = []
    i = 0
    while i < len(samples):
        j = i
        while j < len(samples) and samples[j].layout == samples[i].layout:
            j += 1
        a = max(i, start)
        batches.extend(range(k, min(k + batch_size, j)) for k in range(a, j, batch_size))
        i = j
    return batches


def _stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def make_job(ordered: Sequence[GoodSample], listing: Listing, repo: str, variant: str,
             options: CacheOptions) -> dict[str, Any]:
    """The job record: what decides the cache's content (see `writer`), with its fingerprint."""
    opts = {"variant": variant, "model": os.path.abspath(repo), "dtype": str(np.dtype(as_dtype(options.dtype))),
            "resolution": options.resolution if isinstance(options.resolution, int) else list(options.resolution),
            "upscale": options.upscale,
            "control_resolution": options.control_resolution, "negative_prompt": options.negative_prompt,
            "alpha_background": options.alpha_background, "latent_dtype": "float32"}
    if options.quantize:  # only when set: caches made before the option keep their fingerprint
        opts["text_encoder_quantize"] = options.quantize
    if options.allow_no_reference:  # likewise
        opts["allow_no_reference"] = True
    captions = {s.origin: s.caption_file for s in listing.samples}  # by origin: ids may carry `@<resolution>`
    samples = []
    for g in ordered:
        files = [g.target, *g.controls] + ([captions[g.origin]] if captions.get(g.origin) else [])
        files += [g.mask] if g.mask else []
        row = [g.sample_id, g.target, list(g.controls), g.prompt, list(g.target_size),
               [list(c) for c in g.control_sizes], [_stat(f) for f in files]]
        samples.append(row + [g.mask] if g.mask else row)  # without masks: the record of older caches
    body = {"options": opts, "model_files": model_files(repo), "samples": samples}
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {"format": JOB_FORMAT, "version": JOB_VERSION, "fingerprint": fingerprint, **body}


# ---- encoding ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class HostBatch:
    """One batch prepared on the host: VAE inputs grouped by size, and the text encoder's inputs."""

    samples: list[GoodSample]
    images: dict[tuple[int, int], tuple[np.ndarray, list[tuple[int, int]]]]  # (H, W) → ([n,3,H,W], (sample, slot))
    text: Any  # TextEncoderInputs: prompts, then negative prompts, with each sample's references
    negative: bool  # rows B..2B-1 of `text` are the negative prompt
    masks: list[np.ndarray | None] | None = None  # per sample: [h, w] latent-grid loss mask, or None


class Encoders:
    """The VAE and the prompt encoder of one repo, and the per-batch work (see the module docstring)."""

    def __init__(self, vae: QwenImageVAE, encoder: QwenPromptEncoder, variant: str, *, workers: int | None = None):
        self.vae, self.encoder, self.variant = vae, encoder, variant
        self.pad_token_id = encoder.processor_for(variant).tokenizer.pad_token_id
        self._pool = concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 2), "cache-images")

    @classmethod
    def load(cls, repo: str, variant: str, options: CacheOptions, mesh: Mesh | None = None) -> "Encoders":
        dtype = as_dtype(options.dtype)
        vae = load_vae(os.path.join(repo, "vae"), dtype=dtype, mesh=mesh)
        kw = {"attention": options.attention} if options.attention else {}
        encoder = load_text_encoder(repo, dtype=dtype, mesh=mesh, quantize=options.quantize, **kw)
        return cls(vae, encoder, variant, workers=options.workers)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def prepare(self, samples: Sequence[GoodSample], *, negative_prompt: str | None = " ",
                background: tuple[int, int, int] | None = None) -> HostBatch:
        """Decode, resize and group the batch's images; template and tokenise its prompts, then the
        `negative_prompt` (None: none) with the same images (host only)."""
        paths = sorted({p for s in samples for p in (s.target, *s.controls)})
        decoded = dict(zip(paths, self._pool.map(lambda p: load_image(p, background)[0], paths)))
        jobs = [(i, slot, decoded[p], size) for i, s in enumerate(samples)
                for slot, (p, size) in enumerate(zip((s.target, *s.controls), s.layout))]
        pixels = list(self._pool.map(lambda j: vae_pixels(j[2], j[3]), jobs))
        images: dict[tuple[int, int], tuple[list, list]] = {}
        for (i, slot, _, _), x in zip(jobs, pixels):
            arrays, slots = images.setdefault(x.shape[1:], ([], []))
            arrays.append(x)
            slots.append((i, slot))
        refs = [[decoded[p] for p in s.controls] for s in samples]
        # a batch holds one layout: all samples have references, or none (text-to-image pairs, QwenImagePipeline's
        # template without images)
        variant = self.variant if samples[0].controls else "t2i"
        if variant == "edit":
            refs = [r[0] for r in refs]
        prompts = [s.prompt for s in samples]
        if negative_prompt is not None:
            prompts, refs = prompts + [negative_prompt] * len(samples), refs + refs
        text = self.encoder.prepare(prompts, None if variant == "t2i" else refs, variant)
        masks = [None if s.mask is None else latent_mask(load_mask(s.mask), s.target_size) for s in samples]
        return HostBatch(list(samples), {k: (np.stack(a), s) for k, (a, s) in images.items()}, text,
                         negative_prompt is not None, masks)

    def encode(self, batch: HostBatch) -> list[CachedSample]:
        """Run the VAE and the text encoder on a prepared batch → one `CachedSample` per sample."""
        latents: dict[tuple[int, int], np.ndarray] = {}
        for x, slots in batch.images.values():
            n = len(x)
            padded = bucket_length(n, 1)
            if padded > n:  # one program per (size, batch bucket): pad with copies of the last image
                x = np.concatenate([x, np.repeat(x[-1:], padded - n, axis=0)])
            out = distributed.to_host(self.vae.encode(x))[:n]
            for slot, z in zip(slots, out):
                latents[slot] = np.asarray(z, np.float32)
        pad = self.pad_token_id if batch.text.variant != "t2i" else \
            self.encoder.processor_for("t2i").tokenizer.pad_token_id
        out = self.encoder.encode_inputs(batch.text, pad)
        embeds = distributed.to_host(out.embeds)[:out.batch]
        mask = distributed.to_host(out.mask)[:out.batch].astype(bool)
        lengths = [int(n) for n in out.lengths]
        b = len(batch.samples)
        result = []
        for i, s in enumerate(batch.samples):
            neg = (None, None)
            if batch.negative:
                n = lengths[b + i]
                neg = (embeds[b + i, :n], mask[b + i, :n])
            result.append(CachedSample(
                sample_id=s.sample_id, target=latents[(i, 0)],
                references=[latents[(i, j + 1)] for j in range(len(s.controls))],
                prompt_embeds=embeds[i, :lengths[i]], prompt_mask=mask[i, :lengths[i]],
                negative_prompt_embeds=neg[0], negative_prompt_mask=neg[1],
                mask=batch.masks[i] if batch.masks else None))
        return result


# ---- the job -----------------------------------------------------------------------------------------
def _is_writer() -> bool:
    return jax.process_index() == 0


def _broadcast(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_dataset(dataset: str, model: str, options: CacheOptions, *, log: Callable[[str], None] = _stderr,
                  progress: bool = False) -> tuple[str, Listing, Report]:
    """Steps before any model is loaded: variant, repo folders, layout, every file. Raises `BadInput`
    (bad files without `skip_bad`, or no good sample), `LayoutError`, or OSError/ValueError for the repo."""
    check_repo(model)
    variant = options.variant or read_variant(model)
    listing = read_dataset(dataset, layout=options.layout, control_dirs=options.control_dirs,
                           caption_ext=options.caption_ext, allow_no_reference=options.allow_no_reference)
    if listing.kind == "folder" and not listing.control_dirs and not options.allow_no_reference:
        raise LayoutError(f"--dataset {listing.source}: no control/ folder; the edit models need a reference image "
                          f"per sample (control/, or control_0/, control_1/, … matched by file stem, or "
                          f"--control-dir)")
    n_files = len({p for s in listing.samples for p in (s.target, *s.controls)})
    bar = tqdm(total=n_files, desc="validate", unit="image", disable=None if progress else True,  # None: TTY only
               file=sys.stderr, leave=False)
    try:
        report = validate(listing, variant, options.sizings, background=parse_background(options.alpha_background),
                          allow_empty_prompt=options.allow_empty_prompt,
                          allow_no_reference=options.allow_no_reference, workers=options.workers,
                          progress=bar.update)
    finally:
        bar.close()
    for note in report.notes:
        log(f"note: {note}")
    if report.converted:
        log(f"note: {len(report.converted)} images were converted (details in the report):")
        for line in format_report(dataclasses.replace(report, bad=report.converted), limit=10):
            log(line)
    if any(not g.controls for g in report.good) and not os.path.isdir(os.path.join(model, "tokenizer")):
        raise FileNotFoundError(f"--model {model}: tokenizer/ not found; the text-to-image pairs "
                                f"(--allow-no-reference) are encoded with QwenImagePipeline's tokenizer/")
    if report.bad and not options.skip_bad:
        raise BadInput(f"{report.bad_samples} of {report.total} samples have bad input", report)
    if not report.good:
        raise BadInput(f"none of the {report.total} samples can be cached", report)
    if report.bad:
        log(f"warning: skipping {report.bad_samples} of {report.total} samples (--skip-bad):")
        for line in format_report(report):
            log(line)
    return variant, listing, report


def cache_dataset(dataset: str | os.PathLike, output: str | os.PathLike, model: str | os.PathLike,
                  options: CacheOptions = CacheOptions(), *, mesh: Mesh | None = None,
                  encoders: Encoders | None = None, log: Callable[[str], None] = _stderr,
                  on_batch: Callable[[int], None] | None = None) -> CacheResult:
    """Cache `dataset` into `output` with the encoders of the diffusers repo `model` (see the module doc).

    `encoders`: already loaded ones (else loaded from `model` onto `mesh`). `on_batch(samples_done)` is
    called once the encoders are ready, then after each batch. Raises `BadInput`, `LayoutError`,
    `FileExistsError`, OSError, ValueError.
    """
    t0 = time.perf_counter()
    dataset, model = (os.path.abspath(os.fspath(p)) for p in (dataset, model))
    output = storage.normalize(output)
    log = log if _is_writer() else (lambda _: None)
    variant, listing, report = check_dataset(dataset, model, options, log=log,
                                             progress=options.progress and _is_writer())
    ordered = order_samples(report.good)
    job = make_job(ordered, listing, model, variant, options)
    writer, start = _open_writer(output, job, options, log)
    if start < 0:
        return CacheResult(output, len(ordered), 0, len(ordered), report, time.perf_counter() - t0, True,
                           prompt_lengths(output))
    if start:
        log(f"resuming {partial_path(output)}: {start} of {len(ordered)} samples already cached")
    own = encoders is None
    batches = plan_batches(ordered, options.batch_size, start)
    pool = concurrent.futures.ThreadPoolExecutor(1, "cache-prefetch")
    try:
        if own:
            quant = f", text encoder {options.quantize}" if options.quantize else ""
            log(f"loading the VAE and the text encoder of {model} ({variant}, {options.dtype}{quant})")
            encoders = Encoders.load(model, variant, options, mesh)
        done = start
        if on_batch is not None:
            on_batch(done)  # the encoders are loaded: encoding starts
        bar = _progress_bar(len(ordered), start, options)
        background = parse_background(options.alpha_background)

        def prepare(r: range) -> HostBatch:
            return encoders.prepare([ordered[i] for i in r], negative_prompt=options.negative_prompt,
                                    background=background)

        ahead = [pool.submit(prepare, r) for r in batches[:2]]
        for k, r in enumerate(batches):
            host = ahead.pop(0).result()
            if k + 2 < len(batches):
                ahead.append(pool.submit(prepare, batches[k + 2]))
            samples = encoders.encode(host)
            if writer is not None:
                writer.add(samples)
                if writer.pending_bytes >= options.shard_bytes:
                    writer.flush()
            done += len(r)
            bar.update(len(r))
            if on_batch is not None:
                on_batch(done)
        bar.close()
        if writer is not None:
            writer.finish(cache_metadata(dataset, report, job))
        distributed.sync("cache written")
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if own and encoders is not None:
            encoders.close()
    return CacheResult(output, len(ordered), len(ordered) - start, start, report, time.perf_counter() - t0,
                       prompt_lengths=prompt_lengths(output) if _is_writer() else (0, 0))


def _open_writer(output: str, job: dict[str, Any], options: CacheOptions,
                 log: Callable[[str], None]) -> tuple[PartialCache | None, int]:
    """The writing process's partial cache and the samples it already holds (on every process); -1 when
    `output` is already a finished cache of this job."""
    writer = None
    start = 0
    if _is_writer():
        try:
            writer = PartialCache(output, job, overwrite=options.overwrite, log=log)
            start = writer.done
        except CacheExists as e:
            log(str(e))
            start = -1
    return writer, _broadcast(start)


def _progress_bar(total: int, initial: int, options: CacheOptions) -> tqdm:
    return tqdm(total=total, initial=initial, desc="cache", unit="sample", file=sys.stderr,
                disable=not (options.progress and _is_writer()), dynamic_ncols=True, smoothing=0.1,
                mininterval=0.5 if sys.stderr.isatty() else 10.0,  # a log file gets a line every 10 s
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]")


def prompt_lengths(cache: str) -> tuple[int, int]:
    """(shortest, longest) prompt of a finished cache (a folder or `gs://` prefix), from its manifest."""
    lengths = [int(e["prompt_len"]) for e in json.loads(storage.read_text(storage.join(cache, MANIFEST)))["samples"]]
    return min(lengths), max(lengths)


def cache_metadata(dataset: str, report: Report, job: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `metadata`: where the cache came from, its options, and the bad-input report."""
    return {"created_by": "qwen_edit_jax.caching", "dataset": dataset, "layout": report.kind, **job["options"],
            "report": report.to_json()}


__all__ = ["BadInput", "CacheOptions", "CacheResult", "Encoders", "HostBatch",
           "cache_dataset", "cache_metadata", "check_dataset", "check_repo", "make_job", "model_files",
           "order_samples", "plan_batches", "read_variant"]
