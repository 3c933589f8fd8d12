"""The bucketed, host-split batch loader over a cached dataset (`qwen_edit_jax.cache_format`).

Samples are grouped by image layout (target size + reference sizes) and by text bucket (prompt length
padded up to one of a few lengths, with a mask), so XLA compiles one program per bucket. Each epoch
shuffles within buckets and the order of batches (seeded by (seed, epoch)), every host computes the
same global plan and reads only its rows (`process_index`), and the position (epoch, batch) is part
of the training checkpoint.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..cache_format import CachedDataset, CachedSample, DataError, ImgShapes
from ..packing import pack_latents

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
