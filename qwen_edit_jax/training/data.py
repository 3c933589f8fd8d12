"""The bucketed, host-split batch loader over a cached dataset (`qwen_edit_jax.cache_format`).

Samples are grouped by image layout (target size + reference sizes) and by text bucket (prompt length
padded up to one of a few lengths, with a mask), so XLA compiles one program per bucket. Each epoch
shuffles within buckets and the order of batches (seeded by (seed, epoch)), every host computes the
same global plan and reads only its rows (`process_index`), and the position (epoch, batch) is part
of the training checkpoint.

Several caches mix through `DatasetMix` (`data.datasets`): their samples are numbered one after the
other and each appears `repeats` times in every epoch's plan, shuffled with the rest. Caption dropout
(`data.caption_dropout`) swaps a sample's prompt for its cached empty-prompt encoding; the draw
depends only on (seed, epoch, position, row of the global batch), so it is the same on every host and
after a resume. Masks (`<key>.mask`, see `cache_format`) travel as `loss_mask` [B, N, 4] (packed
like the latents' 2x2 patches; ones for samples without one) whenever some cache of the run has them.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..cache_format import CachedDataset, CachedSample, DataError, ImgShapes, SampleInfo
from ..packing import pack_latents

# ---- several caches ------------------------------------------------------------------------------
class DatasetMix:
    """Several cached datasets read as one: sample `i` of the mix is sample `i − offset_k` of cache k
    (caches in the given order); `repeats[k]` is how many times cache k's samples appear per epoch.

    `infos`, `len()`, `ds[i]`, `latent_channels`, `joint_attention_dim` as on a `CachedDataset`; the
    `fingerprint` of one cache with repeats 1 is that cache's (older checkpoints resume).
    """

    def __init__(self, sources: Sequence[tuple[CachedDataset, int]]):
        if not sources:
            raise DataError("no cached dataset to read")
        self.datasets = [d for d, _ in sources]
        self.repeats = [int(r) for _, r in sources]
        first = self.datasets[0]
        for d, r in sources:
            if r < 1:
                raise DataError(f"{d.path}: repeats={r} must be >= 1")
            for what in ("latent_channels", "joint_attention_dim"):
                if getattr(d, what) != getattr(first, what):
                    raise DataError(f"{d.path}: {what} is {getattr(d, what)}, but {first.path} has "
                                    f"{getattr(first, what)}; the caches of one run must agree")
        self.latent_channels, self.joint_attention_dim = first.latent_channels, first.joint_attention_dim
        self.offsets = [0]
        self.infos: list[SampleInfo] = []
        for d in self.datasets:
            self.infos += [dataclasses.replace(info, index=self.offsets[-1] + info.index) for info in d.infos]
            self.offsets.append(self.offsets[-1] + len(d))
        self.path = first.path if len(self.datasets) == 1 else ", ".join(d.path for d in self.datasets)
        if len(self.datasets) == 1 and self.repeats == [1]:
            self.fingerprint = first.fingerprint
        else:
            raw = json.dumps([[d.fingerprint, r] for d, r in sources]).encode()
            self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(cache number, index in that cache) of mix index `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        k = bisect.bisect_right(self.offsets, i) - 1
        return k, i - self.offsets[k]

    def __getitem__(self, i: int) -> CachedSample:
        k, j = self.locate(int(i))
        return self.datasets[k][j]

    def repeats_of(self, i: int) -> int:
        return self.repeats[self.locate(i)[0]]

    @property
    def has_masks(self) -> bool:
        return any(d.has_masks for d in self.datasets)


def as_mix(dataset: CachedDataset | DatasetMix) -> DatasetMix:
    return dataset if isinstance(dataset, DatasetMix) else DatasetMix([(dataset, 1)])


def require_empty_prompts(dataset: DatasetMix) -> None:
    """Every cache holds each sample's empty-prompt encoding (caption dropout needs it); else a one-line
    `DataError` naming the cache and the caching flag that makes it."""
    for d in dataset.datasets:
        if not d.has_empty_prompt:
            raise DataError(f"{d.path}: data.caption_dropout needs the empty prompt cached per sample; this cache's "
                            f"negative prompt is {d.metadata.get('negative_prompt')!r}: cache it again with "
                            f"train/cache_dataset.py --negative-prompt ' ' (the default)")


_DROPOUT_STREAM = 0x64726F70  # "drop": the dropout draws' own stream, apart from the epoch shuffles


def dropout_draws(seed: int, epoch: int, position: int, n: int, p: float) -> np.ndarray:
    """[n] bool: which rows of the global step (epoch, position) train on the empty prompt."""
    return np.random.default_rng([seed, _DROPOUT_STREAM, epoch, position]).random(n) < p


def with_empty_prompt(sample: CachedSample) -> CachedSample:
    """`sample` with its prompt replaced by its cached empty-prompt encoding (the negative prompt)."""
    return dataclasses.replace(sample, prompt_embeds=sample.negative_prompt_embeds,
                               prompt_mask=sample.negative_prompt_mask)


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


def collate(samples: Sequence[CachedSample], text_len: int, masks: bool = False) -> dict[str, np.ndarray]:
    """Pack latents to tokens and pad prompts to `text_len`: `target` [B, N, 4C], `references`
    [B, M, 4C] (all references concatenated in order), `prompt_embeds` [B, L, J], `prompt_mask` [B, L];
    with `masks`, `loss_mask` [B, N, 4]: each latent pixel's weight at its place in the 2x2 patch
    (feature c·4 + k of a token has weight `loss_mask[..., k]`), ones for samples without a mask."""
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
    out = {"target": target, "references": np.concatenate(refs, axis=0), "prompt_embeds": embeds,
           "prompt_mask": mask}
    if masks:
        out["loss_mask"] = pack_latents(np.stack([
            (np.ones(s.target.shape[1:], np.float32) if s.mask is None else np.asarray(s.mask, np.float32))[None]
            for s in samples]))
    return out


class BatchLoader:
    """Endless, deterministic, resumable iterator of `Batch`es for the training loop.

    One step takes `batch_size × grad_accum` samples of one bucket (global, all hosts); this host
    reads only `local_rows` of each micro-batch (default: the contiguous block
    `[process_index·b, (process_index+1)·b)`, b = batch_size / process_count; with a mesh, pass
    `distributed.local_batch_rows(batch_sharding, batch_size)`). Buckets with fewer samples than
    one step are skipped (reported in `skipped`). `dataset`: one cache or a `DatasetMix` (repeats);
    `caption_dropout`: see the module docstring (needs caches with the empty prompt cached).
    """

    def __init__(
        self,
        dataset: CachedDataset | DatasetMix,
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
        caption_dropout: float = 0.0,
    ):
        dataset = as_mix(dataset)
        if not 0 <= caption_dropout < 1:
            raise DataError(f"caption_dropout={caption_dropout}: must be in [0, 1)")
        if caption_dropout > 0:
            require_empty_prompts(dataset)
        self.caption_dropout = caption_dropout
        self.masks = dataset.has_masks
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
            # with dropout a row may carry the empty prompt instead: its bucket must hold both
            length = max(info.prompt_len, info.negative_prompt_len or 0) if caption_dropout else info.prompt_len
            tb = text_bucket(length, text_buckets)
            if tb is None:
                raise DataError(f"{dataset.datasets[dataset.locate(info.index)[0]].path}: sample {info.sample_id} "
                                f"has {length} prompt tokens, more than the largest data.text_buckets entry "
                                f"{max(text_buckets)}; add a larger bucket")
            buckets[(info.img_shapes, tb)].extend([info.index] * dataset.repeats_of(info.index))
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
                            f"(or other data.datasets / repeats) "
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
        drop = np.zeros((a, b), bool)
        if self.caption_dropout:
            drop = dropout_draws(self.seed, epoch, position, a * b, self.caption_dropout).reshape(a, b)
        drop = drop[:, self.local_rows]
        infos = [self.dataset.infos[i] for i in rows.reshape(-1)]
        img_shapes = infos[0].img_shapes
        micro = []
        for r, dr in zip(rows, drop):
            samples = [with_empty_prompt(self.dataset[int(i)]) if d else self.dataset[int(i)] for i, d in zip(r, dr)]
            micro.append(collate(samples, self._text_lens[int(r[0])], self.masks))
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
