"""Streaming weight I/O: reused scratch buffers, reads into `out`, the writer thread, page-cache drop-behind."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import qwen_edit_jax as q
from qwen_edit_jax.weights import buffers, keymap
from qwen_edit_jax.weights.checkpoint import MergedParams, save_merged
from qwen_edit_jax.weights.lazy import ArrayParams
from qwen_edit_jax.weights.writer import write_behind

TINY = q.preset("tiny")


def random_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(keymap.flax_leaf_shape(e, fl, TINY), dtype=np.float32)
            for p, e, fl, _ in keymap.iter_leaves(TINY)}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    params = random_params()
    path = str(tmp_path_factory.mktemp("merged") / "ckpt")
    save_merged(ArrayParams(params, TINY), path, progress=False)
    return path, params


# ---- the merged checkpoint: streamed in, plain Orbax out --------------------------------------------
def test_merged_checkpoint_restores_with_plain_public_orbax(merged):
    """What `save_merged` writes needs no handler of ours to read: Orbax's public checkpointers give back
    every leaf, bit for bit, as numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    path, params = merged
    params_dir = os.path.abspath(os.path.join(path, "params"))
    for ckptr in (ocp.StandardCheckpointer(), ocp.PyTreeCheckpointer()):
        with ckptr:
            restored = ckptr.restore(params_dir)
        flat = {".".join(k.key for k in kp): v for kp, v in jax.tree_util.tree_leaves_with_path(restored)}
        assert set(flat) == set(params)
        for p, v in params.items():
            assert np.asarray(flat[p]).dtype == v.dtype
            np.testing.assert_array_equal(np.asarray(flat[p]), v)


def test_save_merged_streams_one_layer_at_a_time(tmp_path):
    """No stacked `[L, …]` leaf is ever read whole: every read of a stacked leaf is one layer, and each
    layer is its own zarr chunk on disk."""
    params = random_params(1)
    lazy = ArrayParams(params, TINY)
    real, reads = lazy.read, []

    def read(path, index=None, dtype=None, out=None):
        reads.append((path, index))
        return real(path, index, dtype=dtype, out=out)

    lazy.read = read
    path = str(tmp_path / "ckpt")
    save_merged(lazy, path, progress=False)
    stacked = {p for p, e, _, _ in keymap.iter_leaves(TINY) if e.stacked}
    assert TINY.num_layers > 1 and stacked
    layer_reads = [index for p, index in reads if p in stacked]
    assert len(layer_reads) == len(stacked) * TINY.num_layers
    assert all(len(index) == 1 and index[0].stop - index[0].start == 1 for index in layer_reads)
    back = MergedParams(path)
    for p in stacked:
        assert back._store(p).chunk_layout.read_chunk.shape == (1, *params[p].shape[1:])
        np.testing.assert_array_equal(back.read(p), params[p])


# ---- ScratchBuffers -------------------------------------------------------------------------------
def test_scratch_buffers_reuse_the_smallest_fitting_buffer():
    pool = buffers.ScratchBuffers()
    big = pool.take((1024, 1024), np.float32)  # 4 MiB
    small = pool.take((512, 1024), np.float32)  # 2 MiB
    assert big.shape == (1024, 1024) and big.dtype == np.float32 and big.flags.c_contiguous
    pool.give(big)
    pool.give(small)
    again = pool.take((256, 1024), "bfloat16")  # 0.5 MiB... below the pool's floor: a fresh array
    assert not np.shares_memory(again, small) and not np.shares_memory(again, big)
    mid = pool.take((700, 1024), np.uint16)  # 1.4 MiB: the 2 MiB buffer, not the 4 MiB one
    assert np.shares_memory(mid, small) and not np.shares_memory(mid, big)
    mid[...] = 7  # a shaped, writable view
    other = pool.take((1024, 1024), np.float32)
    assert np.shares_memory(other, big)
    fresh = pool.take((1024, 1024), np.float32)  # nothing free any more
    assert not np.shares_memory(fresh, big) and not np.shares_memory(fresh, small)


def test_scratch_buffers_give_back_twice_is_harmless():
    pool = buffers.ScratchBuffers()
    a = pool.take((1 << 20,), np.uint8)
    pool.give(a)
    pool.give(a)
    b, c = pool.take((1 << 20,), np.uint8), pool.take((1 << 20,), np.uint8)
    assert np.shares_memory(a, b) and not np.shares_memory(b, c)


# ---- reads into `out` -----------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["arrays", "merged"])
def test_read_into_out_equals_plain_read(source, merged):
    path, params = merged
    lazy = ArrayParams(params, TINY) if source == "arrays" else MergedParams(path)
    leaf = "transformer_blocks.attn.to_qkv.kernel"
    index = (slice(1, 2),)
    want = params[leaf][1:2]
    out = np.full(want.shape, np.nan, np.float32)
    assert lazy.read(leaf, index, out=out) is out
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lazy.read(leaf, index), want)
    bf = np.zeros(want.shape, "bfloat16")  # a cast into out
    lazy.read(leaf, index, dtype="bfloat16", out=bf)
    np.testing.assert_array_equal(bf, want.astype("bfloat16"))
    with pytest.raises(ValueError, match=r"to_qkv.kernel: out is float32\[2, "):
        lazy.read(leaf, index, out=np.zeros((2, *want.shape[1:]), np.float32))


def test_merged_direct_io_falls_back_when_refused(merged, monkeypatch):
    """A file system without O_DIRECT (some FUSE mounts): reads switch to ordinary I/O and still succeed."""
    path, params = merged
    lazy = MergedParams(path, direct_io=True)
    real = MergedParams._read
    calls = []

    def refuse_direct(self, p, idx, out):
        calls.append(self.direct_io)
        if self.direct_io:
            raise OSError(22, "Invalid argument (O_DIRECT)")
        return real(self, p, idx, out)

    monkeypatch.setattr(MergedParams, "_read", refuse_direct)
    np.testing.assert_array_equal(lazy.read("img_in.kernel"), params["img_in.kernel"])
    assert calls == [True, False] and lazy.direct_io is False


def test_merged_direct_io_reads_what_was_written(merged):
    path, params = merged
    lazy = MergedParams(path, direct_io=True)
    for leaf in ("img_in.kernel", "transformer_blocks.img_mlp.fc1.kernel"):
        np.testing.assert_array_equal(lazy.read(leaf), params[leaf])
    assert lazy.direct_io  # tmp file systems here take O_DIRECT; no fallback happened


# ---- the writer thread ----------------------------------------------------------------------------
def test_write_behind_writes_in_order_on_another_thread():
    seen = []
    main = threading.get_ident()
    write_behind(((f"t{i}", np.full(3, i)) for i in range(7)),
                 lambda name, v: seen.append((name, int(v[0]), threading.get_ident() != main)))
    assert seen == [(f"t{i}", i, True) for i in range(7)]


def test_write_behind_raises_a_writer_error_and_stops_the_producer():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield str(i), np.zeros(1)

    def write(name, _):
        if name == "3":
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_behind(items(), write)
    assert len(produced) < 100


def test_write_behind_raises_a_producer_error_after_pending_writes():
    written = []

    def items():
        yield "a", np.zeros(1)
        yield "b", np.zeros(1)
        raise ValueError("source tensor 'c' is truncated")

    with pytest.raises(ValueError, match="truncated"):
        write_behind(items(), lambda name, _: written.append(name))
    assert written == ["a", "b"]


# ---- drop-behind ----------------------------------------------------------------------------------
def test_drop_cached_keeps_content_and_ignores_missing_files(tmp_path):
    p = tmp_path / "f.bin"
    data = os.urandom(1 << 16)
    p.write_bytes(data)
    buffers.drop_cached(str(p))
    buffers.drop_cached(str(p), sync=False, offset=4096, length=4096)
    assert p.read_bytes() == data
    buffers.drop_cached(str(tmp_path / "gone.bin"))  # a writer's temporary file renamed meanwhile


def test_drop_behind_drops_files_once_they_stop_growing(tmp_path, monkeypatch):
    dropped = []
    monkeypatch.setattr(buffers, "drop_cached", lambda p, sync=True: dropped.append(os.path.basename(p)))
    d = buffers.DropBehind(str(tmp_path))
    (tmp_path / "a").write_bytes(b"x" * 10)
    d.sweep()
    assert dropped == []  # first seen: may still be written
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y")
    (tmp_path / "a").write_bytes(b"x" * 20)  # grew: still being written
    d.sweep()
    assert dropped == []
    d.sweep()
    assert sorted(dropped) == ["a", "b"]
    d.sweep()
    assert sorted(dropped) == ["a", "b"]  # once
    (tmp_path / "c").write_bytes(b"z")
    d.close()  # the end: everything left, stable or not
    assert sorted(dropped) == ["a", "b", "c"]


def test_drop_behind_sweeps_every_so_many_bytes(tmp_path, monkeypatch):
    d = buffers.DropBehind(str(tmp_path), every=100)
    sweeps = []
    monkeypatch.setattr(d, "sweep", lambda **k: sweeps.append(k))
    for n in (40, 40, 40, 10, 90, 5):
        d.wrote(n)
    assert len(sweeps) == 2  # after 120 and after 100 more bytes


# ---- O_DIRECT safetensors writes ------------------------------------------------------------------
def _plan():
    from qwen_edit_jax.weights.writer import TensorSpec

    rng = np.random.default_rng(1)
    arrays = {"b.weight": rng.standard_normal((300, 70), dtype=np.float32).astype("bfloat16"),
              "a.bias": rng.standard_normal(7, dtype=np.float32), "c.empty": np.zeros((0, 3), np.float32)}
    return arrays, [TensorSpec(k, v.shape, v.dtype) for k, v in arrays.items()]


@pytest.mark.parametrize("direct_available", [True, False])
def test_direct_writer_output_reads_back(tmp_path, monkeypatch, direct_available):
    """Front-to-back O_DIRECT writes give the same file as buffered ones; where the file system refuses
    O_DIRECT the writer falls back to buffered writes."""
    from safetensors.numpy import load_file

    from qwen_edit_jax.weights import writer

    if not direct_available:
        def refuse(self, *a, **k):
            raise OSError(22, "Invalid argument")
        monkeypatch.setattr(writer.DirectFile, "__init__", refuse)
    arrays, specs = _plan()
    for name, direct in (("direct.safetensors", True), ("buffered.safetensors", False)):
        w = writer.SafetensorsWriter(str(tmp_path / name), specs, {"format": "pt"}, direct=direct)
        assert (w._direct is not None) == (direct and direct_available)
        for k, v in arrays.items():
            w.write(k, v)
        w.close()
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()
    back = load_file(str(tmp_path / "direct.safetensors"))
    assert all(np.array_equal(back[k], np.asarray(v)) for k, v in arrays.items() if k != "b.weight")
    assert np.array_equal(back["b.weight"].view(np.uint16), arrays["b.weight"].view(np.uint16))


def test_direct_writer_needs_plan_order(tmp_path):
    from qwen_edit_jax.weights import writer

    arrays, specs = _plan()
    w = writer.SafetensorsWriter(str(tmp_path / "x.safetensors"), specs, direct=True)
    if w._direct is None:
        w.abort()
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    with pytest.raises(ValueError, match="'a.bias' arrived out of plan order"):
        w.write("a.bias", arrays["a.bias"])
    w.abort()


# ---- stream reads of safetensors ------------------------------------------------------------------
def test_stream_reads_equal_mapped_reads(tmp_path, monkeypatch):
    """The converter's reads (whole tensor read ahead, its pages dropped from the cache after): same values
    as ordinary reads, for whole tensors, slices and transposes, and the dropped ranges are the tensors'."""
    from safetensors.numpy import save_file

    from qwen_edit_jax.weights import safetensors_io
    from qwen_edit_jax.weights.safetensors_io import TensorSource

    rng = np.random.default_rng(2)
    arrays = {"a": rng.standard_normal(3, dtype=np.float32),
              "b": rng.standard_normal((1030, 515), dtype=np.float32).astype("bfloat16"),
              "c": rng.standard_normal((7, 9), dtype=np.float32)}
    path = str(tmp_path / "w.safetensors")
    save_file(arrays, path)
    dropped = []
    monkeypatch.setattr(safetensors_io, "drop_cached", lambda p, sync, offset, length: dropped.append((offset, length)))
    plain, stream = TensorSource.open(path), TensorSource.open(path)
    stream.stream = True
    for k, v in arrays.items():
        np.testing.assert_array_equal(stream.get(k).view(np.uint8), v.view(np.uint8))
    assert len(dropped) == 3 and sum(n for _, n in dropped) >= sum(v.nbytes for v in arrays.values())
    np.testing.assert_array_equal(stream.read_slice("b", (slice(3, 900), slice(1, 514)), transpose=True),
                                  plain.read_slice("b", (slice(3, 900), slice(1, 514)), transpose=True))
    out = np.zeros((9, 7), np.float32)
    stream.read_slice("c", (), out=out, transpose=True)
    np.testing.assert_array_equal(out, arrays["c"].T)
    plain.get("a")
    assert len(dropped) == 5  # stream reads only

