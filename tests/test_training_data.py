"""Cached-sample format and the bucketed loader: round trip, buckets, shuffling, host split, resume, errors."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from qwen_edit_jax.packing import pack_latents
from qwen_edit_jax.cache_format import MANIFEST, CachedDataset, CachedSample, DataError, write_cache
from qwen_edit_jax.training.data import BatchLoader, DatasetMix, text_bucket
from qwen_edit_jax.utils import storage

C, J = 16, 8


def _sample(i, h=4, w=6, n_refs=1, length=5, neg=False, rng=None):
    rng = rng or np.random.default_rng(i)
    return CachedSample(
        f"s{i}",
        rng.standard_normal((C, h, w)).astype(np.float32),
        [rng.standard_normal((C, h, w)).astype(np.float32) for _ in range(n_refs)],
        rng.standard_normal((length, J)).astype(ml_dtypes.bfloat16),
        np.arange(length) < length - 1 if length > 1 else np.ones(1, bool),
        rng.standard_normal((3, J)).astype(np.float32) if neg else None,
        np.ones(3, bool) if neg else None,
    )


def _mixed(n=24):
    """Two image layouts, prompt lengths 3..12 (two text buckets of [8, 16])."""
    out = []
    for i in range(n):
        hw = (4, 6) if i % 2 else (6, 4)
        out.append(_sample(i, *hw, length=3 + i % 10, neg=(i % 5 == 0)))
    return out


@pytest.fixture()
def cache(tmp_path):
    samples = _mixed()
    path = write_cache(tmp_path / "cache", samples, shard_bytes=6000)
    return path, samples


def test_roundtrip_exact(cache):
    path, samples = cache
    ds = CachedDataset(path, verify=True)
    assert len(ds) == len(samples) and ds.latent_channels == C and ds.joint_attention_dim == J
    assert len(ds.shards) > 2  # shard_bytes forces several shards
    for i, s in enumerate(samples):
        got = ds[i]
        assert got.sample_id == s.sample_id
        np.testing.assert_array_equal(got.target, s.target)
        assert len(got.references) == 1
        np.testing.assert_array_equal(got.references[0], s.references[0])
        assert got.prompt_embeds.dtype == ml_dtypes.bfloat16  # stored as given
        np.testing.assert_array_equal(got.prompt_embeds, s.prompt_embeds)
        np.testing.assert_array_equal(got.prompt_mask, s.prompt_mask)
        assert (got.negative_prompt_embeds is None) == (s.negative_prompt_embeds is None)
    assert ds.infos[1].img_shapes == ((1, 2, 3), (1, 2, 3))


def test_text_bucket():
    assert text_bucket(3, [16, 8]) == 8 and text_bucket(8, [8, 16]) == 8 and text_bucket(9, [8, 16]) == 16
    assert text_bucket(17, [8, 16]) is None


def test_batches_share_one_bucket_and_pad_text(cache):
    path, samples = cache
    ds = CachedDataset(path)
    loader = BatchLoader(ds, batch_size=2, grad_accum=1, text_buckets=[8, 16], prefetch=0)
    assert len(loader.buckets) == 4  # 2 layouts x 2 text buckets
    seen = []
    for _ in range(loader.steps_per_epoch):
        b = next(loader)
        ids = [int(s[1:]) for s in b.sample_ids]
        seen += ids
        assert len({ds.infos[i].img_shapes for i in ids}) == 1
        assert b.img_shapes == ds.infos[ids[0]].img_shapes
        L = b.arrays["prompt_embeds"].shape[2]
        assert L in (8, 16) and all(text_bucket(samples[i].prompt_embeds.shape[0], [8, 16]) == L for i in ids)
        a = b.arrays
        assert a["target"].shape[:2] == (1, 2) and a["prompt_mask"].dtype == bool
        for row, i in enumerate(ids):
            s = samples[i]
            np.testing.assert_array_equal(a["target"][0, row], pack_latents(s.target[None])[0])
            np.testing.assert_array_equal(a["references"][0, row], pack_latents(s.references[0][None])[0])
            n = s.prompt_embeds.shape[0]
            np.testing.assert_array_equal(a["prompt_embeds"][0, row, :n], s.prompt_embeds.astype(np.float32))
            assert not a["prompt_embeds"][0, row, n:].any() and not a["prompt_mask"][0, row, n:].any()
            np.testing.assert_array_equal(a["prompt_mask"][0, row, :n], s.prompt_mask)
    assert len(seen) == len(set(seen))  # each sample at most once per epoch
    assert loader.epoch == 1 and loader.position == 0


def test_epoch_shuffle_is_seeded(cache):
    ds = CachedDataset(cache[0])

    def plan(seed, epoch):
        return [tuple(x) for x in BatchLoader(ds, batch_size=2, text_buckets=[8, 16], seed=seed,
                                              prefetch=0).epoch_plan(epoch)]

    assert plan(0, 0) == plan(0, 0)
    assert plan(0, 0) != plan(0, 1)
    assert plan(0, 0) != plan(1, 0)
    assert sorted(plan(0, 0)) != plan(0, 0) or sorted(plan(0, 1)) != plan(0, 1)


def test_host_split_covers_the_global_batch(cache):
    ds = CachedDataset(cache[0])
    kw = dict(batch_size=4, grad_accum=1, text_buckets=[16], prefetch=0)
    whole = BatchLoader(ds, **kw)
    hosts = [BatchLoader(ds, process_index=p, process_count=2, **kw) for p in range(2)]
    for _ in range(whole.steps_per_epoch + 1):  # crosses an epoch boundary
        w = next(whole)
        parts = [next(h) for h in hosts]
        assert parts[0].sample_ids + parts[1].sample_ids == w.sample_ids
        for k in w.arrays:
            np.testing.assert_array_equal(np.concatenate([p.arrays[k] for p in parts], axis=1), w.arrays[k])


def test_grad_accum_layout_and_resume_with_prefetch(cache):
    ds = CachedDataset(cache[0])
    kw = dict(batch_size=2, grad_accum=2, text_buckets=[16], prefetch=2)
    a = BatchLoader(ds, **kw)
    ref = [next(a) for _ in range(9)]
    assert ref[0].arrays["target"].shape[:2] == (2, 2)
    b = BatchLoader(ds, **kw)
    for _ in range(4):
        next(b)
    state = json.loads(json.dumps(b.state_dict()))
    b.close()
    c = BatchLoader(ds, **kw)
    c.load_state_dict(state)
    for r in ref[4:]:
        got = next(c)
        assert got.sample_ids == r.sample_ids and (got.epoch, got.position) == (r.epoch, r.position)
    c.close()
    a.close()


def test_small_buckets_are_reported_and_empty_plan_is_an_error(tmp_path):
    samples = [_sample(i, length=4) for i in range(5)] + [_sample(10, 8, 8, length=4)]
    ds = CachedDataset(write_cache(tmp_path / "c", samples))
    loader = BatchLoader(ds, batch_size=2, text_buckets=[8], prefetch=0)
    assert list(loader.skipped.values()) == [1] and loader.steps_per_epoch == 2
    with pytest.raises(DataError, match="no bucket holds one step's 12 samples"):
        BatchLoader(ds, batch_size=4, grad_accum=3, text_buckets=[8])


def test_prompt_longer_than_every_bucket(tmp_path):
    ds = CachedDataset(write_cache(tmp_path / "c", [_sample(0, length=20)]))
    with pytest.raises(DataError, match=r"sample s0 has 20 prompt tokens.*text_buckets"):
        BatchLoader(ds, batch_size=1, text_buckets=[8, 16])


def test_resume_from_another_dataset_is_refused(tmp_path, cache):
    ds = CachedDataset(cache[0])
    other = CachedDataset(write_cache(tmp_path / "other", _mixed(8)))
    state = BatchLoader(ds, batch_size=1, text_buckets=[16], prefetch=0).state_dict()
    with pytest.raises(DataError, match="different cached dataset"):
        BatchLoader(other, batch_size=1, text_buckets=[16], prefetch=0).load_state_dict(state)


# ---- several caches, caption dropout, masks ------------------------------------------------------
def _state_roundtrip(loader):
    return json.loads(json.dumps(loader.state_dict()))


def test_mix_with_repeats_plans_resumes_and_splits_hosts_exactly(tmp_path):
    """Two caches, repeats 1 and 3: every epoch holds cache A's samples once and cache B's three times,
    shuffled together into shared buckets; hosts split each global batch; a resumed loader continues
    with the same batches; the fingerprint names the caches and repeats (one cache x1 keeps its own)."""
    a = CachedDataset(write_cache(tmp_path / "a", [_sample(i, length=4) for i in range(8)]))
    b = CachedDataset(write_cache(tmp_path / "b", [_sample(100 + i, length=6) for i in range(4)]))
    mix = DatasetMix([(a, 1), (b, 3)])
    assert len(mix) == 12 and mix[9].sample_id == "s101" and mix.locate(9) == (1, 1)
    kw = dict(batch_size=4, grad_accum=1, text_buckets=[8], prefetch=0)
    loader = BatchLoader(mix, **kw)
    assert loader.steps_per_epoch == 5  # (8 + 3·4) / 4, one bucket
    for epoch in range(2):
        plan = np.concatenate(loader.epoch_plan(epoch))
        counts = np.bincount(plan, minlength=12)
        assert counts[:8].tolist() == [1] * 8 and counts[8:].tolist() == [3] * 4
    assert any(len({int(i) < 8 for i in step}) == 2 for step in loader.epoch_plan(0))  # the caches mix in a step
    ref = [next(loader) for _ in range(8)]
    assert {i for r in ref[:5] for i in r.sample_ids} == {f"s{i}" for i in [*range(8), *range(100, 104)]}
    hosts = [BatchLoader(mix, process_index=p, process_count=2, **kw) for p in range(2)]
    for r in ref[:3]:
        parts = [next(h) for h in hosts]
        assert parts[0].sample_ids + parts[1].sample_ids == r.sample_ids
        np.testing.assert_array_equal(np.concatenate([p.arrays["target"] for p in parts], axis=1), r.arrays["target"])
    resumed = BatchLoader(DatasetMix([(a, 1), (b, 3)]), **kw)
    probe = BatchLoader(mix, **kw)
    for _ in range(3):
        next(probe)
    resumed.load_state_dict(_state_roundtrip(probe))
    for r in ref[3:]:
        got = next(resumed)
        assert got.sample_ids == r.sample_ids
        np.testing.assert_array_equal(got.arrays["prompt_embeds"], r.arrays["prompt_embeds"])
    assert DatasetMix([(a, 1)]).fingerprint == a.fingerprint
    fps = {DatasetMix(s).fingerprint for s in ([(a, 1), (b, 3)], [(a, 1), (b, 2)], [(b, 3), (a, 1)], [(a, 2)])}
    assert len(fps) == 4
    with pytest.raises(DataError, match="different cached dataset"):
        BatchLoader(DatasetMix([(a, 1), (b, 2)]), **kw).load_state_dict(_state_roundtrip(probe))
    other = CachedDataset(write_cache(tmp_path / "wide", [CachedSample("w", np.zeros((C, 4, 6), np.float32), [],
                                                                       np.ones((3, J + 1), np.float32),
                                                                       np.ones(3, bool))]))
    with pytest.raises(DataError, match=f"{other.path}: joint_attention_dim is {J + 1}, but {a.path} has {J}"):
        DatasetMix([(a, 1), (other, 1)])


def _neg_cache(path, n, *, blank=" ", masks=False, start=0):
    """Samples with a cached negative prompt (2 tokens) and, with `masks`, a grey mask on every other sample."""
    out = []
    for i in range(start, start + n):
        s = _sample(i, length=4 + i % 3, neg=True)
        mask = np.random.default_rng(i).uniform(0, 1, (4, 6)).astype(np.float32) if masks and i % 2 else None
        out.append(CachedSample(s.sample_id, s.target, s.references, s.prompt_embeds, s.prompt_mask,
                                s.negative_prompt_embeds[:2], s.negative_prompt_mask[:2], mask))
    return write_cache(path, out, metadata={} if blank is None else {"negative_prompt": blank})


def test_caption_dropout_uses_the_cached_empty_prompt_deterministically(tmp_path):
    """Dropped rows carry exactly the sample's cached empty-prompt encoding (padded), the others their prompt;
    about `p` of the rows drop; the draws are the same for another loader, on each host's rows and after a
    resume; a cache whose negative prompt is not blank is refused with the flag that fixes it."""
    ds = CachedDataset(_neg_cache(tmp_path / "c", 16))
    by_id = {ds[i].sample_id: ds[i] for i in range(len(ds))}
    kw = dict(batch_size=4, grad_accum=2, text_buckets=[8], prefetch=0, caption_dropout=0.4)
    loader = BatchLoader(ds, **kw)
    batches = [next(loader) for _ in range(10)]
    dropped = []
    for bt in batches:
        embeds = bt.arrays["prompt_embeds"].reshape(8, 8, J)
        pmask = bt.arrays["prompt_mask"].reshape(8, 8)
        for row, sid in enumerate(bt.sample_ids):
            s = by_id[sid]
            drop = pmask[row].sum() == 2 and s.prompt_mask.sum() != 2
            e, m = (s.negative_prompt_embeds, s.negative_prompt_mask) if drop else (s.prompt_embeds, s.prompt_mask)
            np.testing.assert_array_equal(embeds[row, :len(e)], e.astype(np.float32))
            np.testing.assert_array_equal(pmask[row, :len(m)], m)
            assert not pmask[row, len(m):].any()
            dropped.append(drop)
    assert 0.25 < np.mean(dropped) < 0.55, np.mean(dropped)  # 80 draws at p = 0.4
    again = BatchLoader(ds, **kw)
    hosts = [BatchLoader(ds, process_index=p, process_count=2, **kw) for p in range(2)]
    for bt in batches[:4]:
        np.testing.assert_array_equal(next(again).arrays["prompt_embeds"], bt.arrays["prompt_embeds"])
        parts = [next(h) for h in hosts]
        np.testing.assert_array_equal(np.concatenate([p.arrays["prompt_mask"] for p in parts], axis=1),
                                      bt.arrays["prompt_mask"])
    resumed = BatchLoader(ds, **kw)
    resumed.load_state_dict(_state_roundtrip(again))
    for bt in batches[4:]:
        np.testing.assert_array_equal(next(resumed).arrays["prompt_embeds"], bt.arrays["prompt_embeds"])
    for blank in ("a blurry photo", None):
        bad = CachedDataset(_neg_cache(tmp_path / f"bad{blank is None}", 4, blank=blank))
        with pytest.raises(DataError, match=f"^{bad.path}: data.caption_dropout needs .*--negative-prompt ' '"):
            BatchLoader(bad, **kw)


def test_masks_roundtrip_and_travel_packed_like_the_latents(tmp_path):
    """A cached mask reads back exactly (checked by the crc), the manifest marks the samples that have one,
    and `loss_mask` puts each latent pixel's weight where pack_latents puts that pixel's channels (ones
    without a mask); a run without masks carries no `loss_mask`."""
    ds = CachedDataset(_neg_cache(tmp_path / "m", 8, masks=True))
    assert ds.has_masks and [i.has_mask for i in ds.infos] == [bool(i % 2) for i in range(8)]
    loader = BatchLoader(ds, batch_size=2, text_buckets=[8], prefetch=0, shuffle=False)
    for _ in range(loader.steps_per_epoch):
        bt = next(loader)
        for row, sid in enumerate(bt.sample_ids):
            i = int(sid[1:])
            s = ds[i]
            want = np.random.default_rng(i).uniform(0, 1, (4, 6)).astype(np.float32) if i % 2 else np.ones((4, 6))
            if i % 2:
                np.testing.assert_array_equal(s.mask, want)
            full = pack_latents(np.broadcast_to(want, (C, 4, 6))[None])[0]  # the mask on every channel, packed
            np.testing.assert_array_equal(np.tile(bt.arrays["loss_mask"][0, row], (1, C)), full)
    plain = BatchLoader(CachedDataset(_neg_cache(tmp_path / "p", 4)), batch_size=2, text_buckets=[8], prefetch=0)
    assert "loss_mask" not in next(plain).arrays
    # a cache with masks is version 2 (a reader without masks refuses it by version), one without stays 1
    versions = [json.loads((tmp_path / n / MANIFEST).read_text())["version"] for n in ("m", "p")]
    assert versions == [2, 1]
    m = json.loads((tmp_path / "p" / MANIFEST).read_text())
    (tmp_path / "p" / MANIFEST).write_text(json.dumps({**m, "version": 3}))
    with pytest.raises(DataError, match="unsupported version 3 \\(this reader knows 1, 2\\)"):
        CachedDataset(tmp_path / "p")
    with pytest.raises(DataError, match=r"sample x: mask shape \(2, 2\) is not the target latent's \(4, 6\)"):
        write_cache(tmp_path / "bad", [CachedSample("x", np.zeros((C, 4, 6), np.float32), [], np.ones((2, J)),
                                                    np.ones(2, bool), mask=np.ones((2, 2)))])
    with pytest.raises(DataError, match=r"sample x: mask values must be in \[0, 1\]"):
        write_cache(tmp_path / "bad", [CachedSample("x", np.zeros((C, 4, 6), np.float32), [], np.ones((2, J)),
                                                    np.ones(2, bool), mask=np.full((4, 6), 2.0))])


# ---- corrupt / missing data ---------------------------------------------------------------------
def _data_offset(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 8 + n


def test_flipped_byte_names_the_sample(cache):
    path, _ = cache
    ds = CachedDataset(path)
    shard = os.path.join(path, ds.shards[0]["file"])
    with open(shard, "r+b") as f:
        f.seek(_data_offset(shard) + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    ds = CachedDataset(path)
    with pytest.raises(DataError, match=r"sample s0 \(#0\) in .*shard-00000\.safetensors: checksum mismatch"):
        ds[0]
    with pytest.raises(DataError, match=r"shard-00000\.safetensors: sha256 mismatch"):
        CachedDataset(path, verify=True)


def test_truncated_missing_and_garbled_shards(cache):
    path, _ = cache
    ds = CachedDataset(path)
    s1 = os.path.join(path, ds.shards[1]["file"])
    data = open(s1, "rb").read()
    with open(s1, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: shard is \d+ bytes, the manifest says"):
        CachedDataset(path)
    with open(s1, "wb") as f:  # same size, destroyed header
        f.write(b"\xff" * len(data))
    ds = CachedDataset(path)
    idx = next(i.index for i in ds.infos if i.shard == 1)
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: corrupt shard"):
        ds[idx]
    os.remove(s1)
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: shard missing"):
        CachedDataset(path)


def test_bad_manifests(tmp_path, cache):
    path, _ = cache
    with pytest.raises(DataError, match="cached dataset folder not found"):
        CachedDataset(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match=r"manifest\.json: missing"):
        CachedDataset(tmp_path / "empty")
    m = os.path.join(path, MANIFEST)
    text = open(m).read()
    with open(m, "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(DataError, match="corrupt manifest, not valid JSON"):
        CachedDataset(path)
    bad = json.loads(text)
    del bad["samples"][3]["crc32"]
    with open(m, "w") as f:
        json.dump(bad, f)
    with pytest.raises(DataError, match="corrupt manifest, bad or missing field"):
        CachedDataset(path)


# ---- a cache in a bucket (gs:// on the tests' emulator) -----------------------------------------------
def _arrays(s):
    return [s.target, *s.references, s.prompt_embeds, s.prompt_mask, s.negative_prompt_embeds, s.negative_prompt_mask,
            s.mask]


def test_a_cache_on_gs_reads_as_the_local_one_each_host_fetching_only_its_rows(cache, gcs_dir):
    """The same samples and batches as from the local folder; one sample read costs its shard's header and
    its own bytes; two hosts each fetch only the samples of their rows."""
    path, _ = cache
    storage.upload_tree(path, gcs_dir, marker=MANIFEST)
    local, remote = CachedDataset(path), CachedDataset(gcs_dir + "/", verify=True)
    assert remote.path == gcs_dir and remote.fingerprint == local.fingerprint and remote.shards == local.shards
    info = remote.infos[5]
    got, want = remote[5], local[5]
    for a, b in zip(_arrays(got), _arrays(want), strict=True):
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
    shard = os.path.join(path, local.shards[info.shard]["file"])
    assert remote.bytes_fetched == _data_offset(shard) + sum(a.nbytes for a in _arrays(want) if a is not None)
    kw = dict(batch_size=2, text_buckets=(8, 16), seed=3, prefetch=0)
    whole = BatchLoader(local, **kw)
    hosts = [BatchLoader(CachedDataset(gcs_dir), process_index=p, process_count=2, **kw) for p in (0, 1)]
    for _ in range(whole.steps_per_epoch):
        b, parts = next(whole), [next(h) for h in hosts]
        for k, v in b.arrays.items():
            np.testing.assert_array_equal(np.concatenate([p.arrays[k] for p in parts], axis=1), v)
    total = sum(s["bytes"] for s in local.shards)
    fetched = [h.dataset.datasets[0].bytes_fetched for h in hosts]
    assert all(0 < f < 0.6 * total for f in fetched), (fetched, total)


def test_a_damaged_cache_on_gs_names_the_sample_or_shard(cache, gcs_dir):
    path, _ = cache
    shards = CachedDataset(path).shards
    first = os.path.join(path, shards[0]["file"])
    data = bytearray(open(first, "rb").read())
    data[_data_offset(first) + 5] ^= 0xFF
    storage.upload_tree(path, gcs_dir, marker=MANIFEST)
    storage.write_bytes(storage.join(gcs_dir, shards[0]["file"]), bytes(data))
    with pytest.raises(DataError, match=r"sample s0 \(#0\) in gs://.*shard-00000\.safetensors: checksum mismatch"):
        CachedDataset(gcs_dir)[0]
    with pytest.raises(DataError, match=r"gs://.*shard-00000\.safetensors: sha256 mismatch"):
        CachedDataset(gcs_dir, verify=True)
    storage.as_path(storage.join(gcs_dir, shards[1]["file"])).unlink()
    with pytest.raises(DataError, match=r"gs://.*shard-00001\.safetensors: shard missing"):
        CachedDataset(gcs_dir)
    with pytest.raises(DataError, match=f"^{gcs_dir}-nope: cached dataset folder not found$"):
        CachedDataset(gcs_dir + "-nope")


def test_write_validates_samples(tmp_path):
    good = _sample(0)
    cases = [
        (_sample(1, h=5), r"sample s1: target must be \[C, h, w\] with even h and w"),
        (CachedSample("n", np.full((C, 4, 4), np.nan, np.float32), [], good.prompt_embeds, good.prompt_mask),
         "sample n: target contains NaN"),
        (CachedSample("c", np.zeros((8, 4, 4), np.float32), [], good.prompt_embeds, good.prompt_mask),
         "sample c: target has 8 channels, the dataset has 16"),
        (CachedSample("m", good.target, [], good.prompt_embeds, np.ones(2, bool)),
         "sample m: prompt_mask shape"),
        (CachedSample("s0", good.target, [], good.prompt_embeds, good.prompt_mask), "duplicate sample id 's0'"),
    ]
    for i, (bad, msg) in enumerate(cases):
        with pytest.raises(DataError, match=msg):
            write_cache(tmp_path / f"c{i}", [good, bad])
        assert not os.path.exists(tmp_path / f"c{i}")  # nothing half-written
        assert not [p for p in os.listdir(tmp_path) if p.startswith(f".c{i}")]
    with pytest.raises(FileExistsError):
        write_cache(tmp_path / "ok", [good]) and write_cache(tmp_path / "ok", [good])
