"""Merged Flax params on disk: an Orbax PyTree checkpoint + config.json (the converter's `to_merged`).

Layout of a merged checkpoint folder:

    OUT/config.json          diffusers config of the weights (zero_cond_t included)
    OUT/params/              Orbax PyTree checkpoint (OCDBT, zarr); tree = nested dict of the Flax
                             base-parameter paths (`transformer_blocks.attn.to_qkv.kernel` [L, D, 3, D], …)
    OUT/qwen_edit_jax.json   marker: format, version, source, per-leaf dtypes, quantize (None|int8|fp8|int4)

`OUT` may be a `gs://bucket/prefix`: Orbax / tensorstore write and read the params there directly, and
the marker, written last, is the commit marker (object stores have no rename: a prefix without it is
refused); a local `OUT` is written under a temporary name and renamed.

A quantized checkpoint (`quantize` in the marker) stores every block kernel
(`transformer_blocks.….kernel`) as int8 / float8_e4m3fn / int4 values and its fp32 scales next to it
as `….kernel_scale` `[L, groups, *out]` (one group for int8 / fp8, `config.INT4_GROUP_SIZE` input rows a
group for int4); everything else as in a float checkpoint.

Writing streams: every leaf is a `LazyLeaf` (a view on the source checkpoint) and
`LazyLeafHandler` (an Orbax `TypeHandler`, public API only) writes stacked leaves one layer at a
time into per-layer zarr chunks, so no stacked `[L, …]` array is ever materialised; a byte budget
bounds the layers in flight. The stored leaves are what Orbax's `NumpyHandler` writes for a numpy
array (same tensorstore spec, typestr 'np.ndarray'): any Orbax restore reads them.

Reading: `load_merged_params(path, abstract_state, shardings)` restores straight onto devices
with target shardings (Orbax reads only each device's slice); `MergedParams` is a `LazyParams`
view (tensorstore slice reads) used to convert back to the standard layout layer by layer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes  # noqa: F401
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from etils import epath
from orbax.checkpoint import future as ocp_future
from orbax.checkpoint import multihost as ocp_multihost

from ..config import DiTConfig, as_dtype, quant_scale_rows
from ..errors import CheckpointError
from ..utils import storage
from ..utils.files import atomic_path
from . import keymap
from .buffers import DropBehind, ScratchBuffers
from .lazy import Index, LazyParams, check_out, check_params, into_out, layer_shape, norm_index

MARKER = "qwen_edit_jax.json"
PARAMS_DIR = "params"
FORMAT = "qwen_edit_jax.merged_params"
VERSION = 1
DEFAULT_BUDGET = 256 << 20  # bytes of layers read but not yet written, across all leaves


SCALE_SUFFIX = "_scale"


def is_quantized_kernel(path: str) -> bool:
    """True for the leaves a quantized base stores as int8 / fp8 / int4 + scales: the blocks' linear kernels."""
    return path.startswith("transformer_blocks.") and path.endswith(".kernel")


def scale_path(kernel_path: str) -> str:
    return kernel_path + SCALE_SUFFIX


def expected_shapes(config: DiTConfig, quantize: str | None = None) -> dict[str, tuple[int, ...]]:
    """Every stored leaf's shape: the key map's Flax leaves, plus `….kernel_scale` `[L, groups, *out]` when
    quantized (`config.quant_scale_rows`: 1 for int8 / fp8)."""
    out = {p: keymap.flax_leaf_shape(e, fl, config) for p, e, fl, _ in keymap.iter_leaves(config)}
    if quantize:
        for p in [p for p in out if is_quantized_kernel(p)]:
            shape = out[p]
            out[scale_path(p)] = (shape[0], quant_scale_rows(quantize, shape[1]), *shape[2:])
    return out


def is_merged_checkpoint(path: str | os.PathLike) -> bool:
    """A folder or `gs://` prefix holding the marker (a prefix without it is not a checkpoint: see `read_marker`)."""
    path = os.fspath(path)
    if storage.is_remote(path):
        return storage.exists(storage.join(path, MARKER))
    return os.path.isdir(path) and os.path.exists(os.path.join(path, MARKER))


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---- writing ----------------------------------------------------------------------------------
class _Budget:
    """Byte budget shared by all leaves being written (asyncio; one event loop)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond: asyncio.Condition | None = None

    async def acquire(self, n: int) -> None:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            await self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class _Progress:
    """Thread-safe tqdm updates: bytes on the bar, tensors in the postfix."""

    def __init__(self, bar: Any, total_tensors: int):
        self.bar, self.total, self.done = bar, total_tensors, 0
        self._lock = threading.Lock()

    def update(self, nbytes: int, tensors: int) -> None:
        if self.bar is None:
            return
        with self._lock:
            self.done += tensors
            self.bar.set_postfix_str(f"tensors {self.done}/{self.total}", refresh=False)
            self.bar.update(nbytes)


@dataclasses.dataclass
class _WriteState:
    """What every leaf of one `save_merged` shares: byte budget, progress, scratch buffers, drop-behind."""

    budget: _Budget
    progress: _Progress
    buffers: ScratchBuffers
    drop: DropBehind | None = None


class LazyLeaf:
    """One Flax leaf of a `LazyParams` source, read layer by layer (into reused buffers) when Orbax writes it."""

    def __init__(self, lazy: LazyParams, path: str, dtype: Any, stacked: bool, tensors_per_layer: int,
                 shared: _WriteState):
        self.lazy, self.path = lazy, path
        self.shape = tuple(lazy.shape(path))
        self.dtype = np.dtype(dtype)
        self.stacked = stacked
        self.tensors_per_layer = tensors_per_layer
        self.shared = shared

    @property
    def write_shape(self) -> tuple[int, ...]:
        return layer_shape(self.shape, self.stacked)

    def read(self, layer: int | None) -> np.ndarray:
        """One layer (or the whole unstacked leaf) in a scratch buffer; `shared.buffers.give` it back after use."""
        index = None if layer is None else (slice(layer, layer + 1),)
        out = self.shared.buffers.take(self.write_shape, self.dtype)
        try:
            return self.lazy.read(self.path, index, dtype=self.dtype, out=out)
        except BaseException:
            self.shared.buffers.give(out)
            raise


async def _write_leaf(leaf: LazyLeaf, tspec: dict[str, Any], ts_context: Any) -> None:
    """Create the leaf's array and write it one layer (one zarr chunk) at a time, within the byte budget."""
    base = tspec.get("kvstore", {}).get("base")
    if leaf.shared.drop is not None and isinstance(base, dict):
        # no fsync per chunk: the drop-behind sweep syncs each finished file, off the writers' path
        tspec = {**tspec, "kvstore": {**tspec["kvstore"], "base": {**base, "file_io_sync": False}}}
    t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
    layers = range(leaf.shape[0]) if leaf.stacked else [None]
    per = int(np.prod(leaf.write_shape)) * leaf.dtype.itemsize
    shared = leaf.shared
    for layer in layers:
        await shared.budget.acquire(per)
        try:
            value = await asyncio.to_thread(leaf.read, layer)
            try:
                target = t if layer is None else t[layer: layer + 1]
                # tensorstore copies the value (no `can_reference_source_data_indefinitely`): the buffer is
                # reused once this write is done
                await target.write(value)
            finally:
                shared.buffers.give(value)
        finally:
            await shared.budget.release(per)
        if shared.drop is not None:
            await asyncio.to_thread(shared.drop.wrote, per)
        shared.progress.update(per, leaf.tensors_per_layer)


async def _write_leaves(values: list[LazyLeaf], infos: list[Any], args: list[Any]) -> None:
    """Every leaf of one `serialize` call, concurrently; the first error cancels the others before it propagates."""
    writes = []
    for value, info, arg in zip(values, infos, args):
        await info.await_path_creation()
        use_ocdbt = bool(info.is_ocdbt_checkpoint)
        # the spec Orbax's NumpyHandler writes a numpy array with, but chunked one layer at a time
        tspec = ocp.type_handlers.get_json_tspec_write(
            info, use_ocdbt, global_shape=value.shape, local_shape=value.write_shape, dtype=value.dtype,
            process_index=ocp_multihost.process_index() if use_ocdbt else None, arg=arg)
        writes.append(asyncio.ensure_future(_write_leaf(value, tspec, info.ts_context)))
    try:
        await asyncio.gather(*writes)
    except BaseException:  # stop every other leaf before the error propagates (no writes after cleanup)
        for w in writes:
            w.cancel()
        await asyncio.gather(*writes, return_exceptions=True)
        raise


class LazyLeafHandler(ocp.type_handlers.TypeHandler):
    """Orbax handler for `LazyLeaf`, through Orbax's public `TypeHandler` interface.

    Writes a leaf as Orbax's `NumpyHandler` stores a numpy array (typestr 'np.ndarray', its
    tensorstore spec), one layer (= one zarr chunk) at a time; metadata and reading are the
    `NumpyHandler`'s, so a plain Orbax restore reads what this wrote.
    """

    def __init__(self):
        self.numpy = ocp.type_handlers.NumpyHandler()

    def typestr(self) -> str:
        return self.numpy.typestr()

    async def metadata(self, infos):
        return await self.numpy.metadata(infos)

    async def deserialize(self, infos, args=None):
        return await self.numpy.deserialize(infos, args)

    async def serialize(self, values, infos, args=None):
        args = list(args or [ocp.type_handlers.SaveArgs()] * len(values))
        ocp.type_handlers.check_input_arguments(values, infos, args)
        return [ocp_future.CommitFutureAwaitingContractedSignals(
            _write_leaves(list(values), list(infos), args), name="qwen_edit_jax_lazy_leaf")]


def save_merged(
    lazy: LazyParams,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    memory_budget: int | None = None,
    source: str | None = None,
    compression: bool = False,
    drop_behind: bool = True,
) -> str:
    """Write `lazy` (any layout) as a merged checkpoint folder; atomic (temp folder + rename; on a `gs://`
    prefix the marker, written last, commits it; an existing one is deleted first with `overwrite`).

    Each leaf keeps the source dtype (a bf16 checkpoint stays bf16) unless `dtype` is given.
    Peak host memory ≈ `memory_budget` + one layer per leaf being read (in reused buffers).
    `drop_behind`: sync each written file once finished and drop it from the page cache (`buffers.DropBehind`),
    instead of tensorstore syncing every chunk; all is synced before the folder gets its final name.
    A source with a `quantize` attribute (`loading.quantized.QuantizedParams`) writes a quantized
    checkpoint: its int8 / fp8 / int4 kernels and fp32 scales as they are (`dtype` casts the float leaves only).
    """
    out = os.fspath(path)
    cast = None if dtype is None else np.dtype(as_dtype(dtype))
    quantize = getattr(lazy, "quantize", None)
    stacked_paths = {p: (e.stacked, len(e.torch)) for p, e, _, _ in keymap.iter_leaves(lazy.config)}
    if quantize:
        stacked_paths.update({scale_path(p): (True, 0) for p in list(stacked_paths) if is_quantized_kernel(p)})
        check_params(getattr(lazy, "description", "source"), {p: lazy.shape(p) for p in lazy.paths()},
                     expected_shapes(lazy.config, quantize))
    keep = {p for p in lazy.paths() if quantize and (is_quantized_kernel(p) or p.endswith(SCALE_SUFFIX))}
    dtypes = {p: np.dtype(lazy.dtype(p)) if p in keep else cast or np.dtype(lazy.dtype(p)) for p in lazy.paths()}
    total = sum(int(np.prod(lazy.shape(p))) * dtypes[p].itemsize for p in lazy.paths())
    n_tensors = sum(n * (lazy.config.num_layers if s else 1) for s, n in stacked_paths.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="to_merged")
    shared = _WriteState(_Budget(memory_budget or DEFAULT_BUDGET), _Progress(bar, n_tensors), ScratchBuffers())
    leaves = {}
    for p in lazy.paths():
        stacked, n = stacked_paths[p]
        leaves[p] = LazyLeaf(lazy, p, dtypes[p], stacked, n, shared)
    registry = ocp.type_handlers.create_type_handler_registry(
        (LazyLeaf, LazyLeafHandler()), (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=False, use_compression=compression,
                                          type_handler_registry=registry)

    def write(folder: str, drop: bool) -> None:
        """config.json, the params, and the marker last (the commit on a bucket)."""
        storage.write_text(storage.join(folder, "config.json"), json.dumps(lazy.config.to_dict(), indent=2) + "\n")
        shared.drop = DropBehind(folder, sync=True) if drop else None
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(storage.as_path(storage.join(folder, PARAMS_DIR)), args=ocp.args.PyTreeSave(_nest(leaves)))
        if shared.drop is not None:
            shared.drop.close()
        marker = {"format": FORMAT, "version": VERSION, "fuse_qkv": True, "quantize": quantize,
                  "source": source or getattr(lazy, "description", ""),
                  "dtypes": {p: dtypes[p].name for p in sorted(dtypes)}}
        storage.write_text(storage.join(folder, MARKER), json.dumps(marker, indent=2) + "\n")

    try:
        if storage.is_remote(out):
            out = storage.normalize(out)
            _clear_remote(out, overwrite)
            write(out, False)
        else:
            with atomic_path(out, overwrite=overwrite, is_dir=True) as tmp:
                write(tmp, drop_behind)
    finally:
        if bar is not None:
            bar.close()
    return out


def _clear_remote(out: str, overwrite: bool) -> None:
    """Make room for a checkpoint at the prefix `out`: refused when objects are there unless `overwrite`; then
    the old marker goes first (uncommitting it: no rename in a bucket), then every object."""
    if not storage.isdir(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    marker = storage.join(out, MARKER)
    if storage.exists(marker):
        storage.as_path(marker).unlink()
    storage.remove_tree(out)


# ---- reading ----------------------------------------------------------------------------------
def read_marker(path: str) -> dict[str, Any]:
    """The checkpoint's marker, checked; a folder or prefix without it is refused (one line): not complete."""
    mpath = storage.join(path, MARKER)
    try:
        marker = json.loads(storage.read_text(mpath))
    except FileNotFoundError:
        raise CheckpointError(f"{mpath}: missing; {path} is not a complete merged checkpoint (its marker is "
                              f"written last)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath}: not a readable merged-checkpoint marker ({e})") from None
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise CheckpointError(f"{mpath}: format {marker.get('format')!r} v{marker.get('version')} is not "
                              f"{FORMAT!r} v{VERSION}")
    if not storage.isdir(storage.join(path, PARAMS_DIR)):
        raise CheckpointError(f"{path}: merged checkpoint has no {PARAMS_DIR}/ folder (incomplete copy?)")
    return marker


def read_merged_config(path: str | os.PathLike, config: DiTConfig | None = None) -> DiTConfig:
    """The checkpoint's config; a given `config` must agree with it."""
    path = os.fspath(path)
    read_marker(path)
    cpath = storage.join(path, "config.json")
    stored = (DiTConfig.from_dict(json.loads(storage.read_text(cpath)), source=cpath) if storage.is_remote(path)
              else DiTConfig.from_json(cpath))
    if config is not None and config != stored:
        raise CheckpointError(f"{path}: the given config {config} does not match the checkpoint's config.json "
                              f"{stored}")
    return stored


class MergedParams:
    """`LazyParams` over a merged checkpoint: slice reads straight from the zarr chunks.

    `direct_io` (a reader that reads each byte once, the converter): chunks are read with O_DIRECT,
    around the page cache (see `buffers`); where the file system refuses it, reads fall back to
    ordinary I/O.
    """

    def __init__(self, path: str | os.PathLike, config: DiTConfig | None = None, *, direct_io: bool = False):
        self.path = os.fspath(path)
        self.direct_io = direct_io and not storage.is_remote(self.path)  # O_DIRECT: local files only
        self.marker = read_marker(self.path)
        self.config = read_merged_config(self.path, config)
        self.description = f"{self.path} (merged checkpoint)"
        self.fuse_qkv = True
        self._params_dir = storage.normalize(storage.join(self.path, PARAMS_DIR))
        self._dtypes = {p: np.dtype(d) for p, d in self.marker["dtypes"].items()}
        self._stores: dict[str, Any] = {}
        self._ctx = ocp.type_handlers.get_ts_context(use_ocdbt=True)
        self.quantize = self.marker.get("quantize")  # None, "int8", "fp8", "int4"
        expected = expected_shapes(self.config, self.quantize)
        # names here; each leaf's stored shape is checked when its store is first opened (`_store`)
        check_params(self.path, {p: expected.get(p, ()) for p in self._dtypes}, expected,
                     hint="the parameters do not match config.json")
        self._shapes = expected

    def _store(self, p: str):
        t = self._stores.get(p)
        if t is None:
            # the spec Orbax reads the leaf with (`NumpyHandler.deserialize`), from its public helper
            info = ocp.type_handlers.ParamInfo(name=p, parent_dir=epath.Path(self._params_dir),
                                               is_ocdbt_checkpoint=True, use_zarr3=False, ts_context=self._ctx)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
            if self.direct_io:
                spec["kvstore"]["base"]["file_io_mode"] = {"mode": "direct"}
            try:
                t = ts.open(spec, open=True, context=self._ctx).result()
            except Exception as e:
                raise CheckpointError(f"{self._params_dir}: cannot open parameter {p} ({e})") from None
            if tuple(t.shape) != self._shapes[p]:
                raise CheckpointError(f"{self._params_dir}: parameter {p} has shape {tuple(t.shape)}, config.json "
                                      f"implies {self._shapes[p]}")
            self._stores[p] = t
        return t

    def paths(self) -> list[str]:
        return list(self._shapes)

    def shape(self, path: str) -> tuple[int, ...]:
        return self._shapes[path]

    def dtype(self, path: str) -> np.dtype:
        return self._dtypes[path]

    def _read(self, path: str, idx: tuple[slice, ...], out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return self._store(path)[idx].read().result()
        ts.array(out, copy=False).write(self._store(path)[idx]).result()
        return out

    def read(self, path: str, index: Index | None = None, dtype: Any = None, out: np.ndarray | None = None
             ) -> np.ndarray:
        """`leaf[index]`; with `out` (and no cast) tensorstore copies the chunk bytes straight into it."""
        idx = norm_index(index, self._shapes[path])
        shape = tuple(len(range(s.start, s.stop, s.step)) for s in idx)
        stored = self._dtypes[path]
        want = stored if dtype is None else np.dtype(as_dtype(dtype))
        try:
            value = self._read(path, idx, None if out is None or want != stored else check_out(out, shape, want, path))
        except Exception as e:
            if self.direct_io:  # e.g. a FUSE mount without O_DIRECT: from now on, read the usual way
                self.direct_io, self._stores = False, {}
                return self.read(path, index, dtype, out)
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{self._params_dir}: cannot read parameter {path} ({e})") from None
        if value is out:
            return out
        return into_out(value if want == stored else value.astype(want), out, path)


def load_merged_params(path: str | os.PathLike, abstract_state: Any, shardings: Any = None) -> Any:
    """Restore merged params straight onto devices.

    `abstract_state`: an `nnx.State` of the base parameters (e.g. `nnx.state(abstract_model(cfg, opts),
    BASE_PARAMS)`), or a nested / flat `{path: jax.ShapeDtypeStruct}` dict. `shardings`: the same
    structure of `jax.sharding.Sharding` (None: first device; a leaf's own `.sharding` is used when
    it has one). Values are cast to the abstract dtype. Returns the same structure with jax Arrays.
    """
    path = os.fspath(path)
    marker = read_marker(path)
    is_state = isinstance(abstract_state, nnx.State)
    if is_state:
        tree = abstract_state.to_pure_dict()
    else:
        tree = abstract_state
    flat_abs = _flatten(tree) if any(isinstance(v, Mapping) for v in tree.values()) else dict(tree)
    flat_sh = {}
    if shardings is not None:
        sh_tree = shardings.to_pure_dict() if isinstance(shardings, nnx.State) else shardings
        flat_sh = _flatten(sh_tree) if any(isinstance(v, Mapping) for v in sh_tree.values()) else dict(sh_tree)
    stored = marker["dtypes"]
    unknown = sorted(set(flat_abs) - set(stored))
    if unknown:
        raise CheckpointError(f"{path}: merged checkpoint has no parameters {unknown[:3]}")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args, target = {}, {}
    for p, a in flat_abs.items():
        shape, dt = tuple(a.shape), a.dtype
        sharding = flat_sh.get(p) or getattr(a, "sharding", None) or default
        restore_args[p] = ocp.type_handlers.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=dt)
        target[p] = jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    # Leaves not asked for are skipped with PLACEHOLDER so a partial abstract state works.
    for p in set(stored) - set(flat_abs):
        restore_args[p] = ocp.type_handlers.RestoreArgs()
        target[p] = ocp.PLACEHOLDER
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True)
    with ocp.Checkpointer(handler) as ckptr:
        try:
            restored = ckptr.restore(storage.as_path(storage.join(path, PARAMS_DIR)), args=ocp.args.PyTreeRestore(
                item=_nest(target), restore_args=_nest(restore_args)))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot restore merged params ({type(e).__name__}: {e})") from None
    flat = {p: v for p, v in _flatten(restored).items() if p in flat_abs}
    for p, v in flat.items():
        if tuple(v.shape) != tuple(flat_abs[p].shape):
            raise CheckpointError(f"{path}: parameter {p} has shape {tuple(v.shape)}, expected "
                                  f"{tuple(flat_abs[p].shape)}")
    if is_state:
        state = jax.tree.map(lambda x: x, abstract_state)
        nnx.replace_by_pure_dict(state, _nest(flat))
        return state
    return _nest(flat) if any(isinstance(v, Mapping) for v in tree.values()) else flat
