"""Opening base weights lazily in any layout: `TorchLayoutParams` (diffusers names, any container)
and `open_lazy_params` (which also recognises this project's merged Orbax checkpoints).

Weights in a bucket (`gs://`): a merged checkpoint is read in place (tensorstore reads each device's
slices from the bucket); safetensors are read from a local copy (`local_weights`: whole files
downloaded in parallel once, then memory-mapped; see docs/convert.md for why).
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import numpy as np

from ..config import DiTConfig, as_dtype
from ..errors import CheckpointError
from ..utils import storage
from . import keymap, layout
from .checkpoint import PARAMS_DIR, MergedParams, is_merged_checkpoint, read_marker
from .lazy import Index, LazyParams, check_out, check_params, norm_index
from .safetensors_io import TensorSource, np_dtype


class TorchLayoutParams:
    """Flax-layout view of a diffusers-named checkpoint (`TensorSource`)."""

    def __init__(self, source: TensorSource, config: DiTConfig, *, fuse_qkv: bool = True, validate: bool = True):
        self.source, self.config, self.fuse_qkv = source, config, fuse_qkv
        self.description = source.description
        self._expected = keymap.torch_shapes(config)
        self._leaves = {p: (e, fl, tl) for p, e, fl, tl in keymap.iter_leaves(config, fuse_qkv)}
        if validate:
            self.validate()

    def validate(self) -> None:
        """Every expected tensor present with the right shape, nothing unexpected."""
        have = {k: self.source.shape(k) for k in self.source.keys()}
        check_params(self.description, have, self._expected, where=self.source.file_of,
                     hint=f"does the config match the weights? num_layers={self.config.num_layers}")

    def paths(self) -> list[str]:
        return list(self._leaves)

    def shape(self, path: str) -> tuple[int, ...]:
        entry, fleaf, _ = self._leaves[path]
        return keymap.flax_leaf_shape(entry, fleaf, self.config)

    def dtype(self, path: str) -> np.dtype:
        """Stored dtype of one Flax leaf (the common type of its torch tensors), without reading data."""
        entry, _, tleaf = self._leaves[path]
        names = keymap.torch_names_for(entry, tleaf, 0 if entry.stacked else None)
        return np.result_type(*[np.dtype(np_dtype(self.source.dtype(n))) for n in names])

    def read(self, path: str, index: Index | None = None, dtype: Any = None, out: np.ndarray | None = None
             ) -> np.ndarray:
        """`leaf[index]` in Flax layout, reading only the torch bytes the slice covers.

        Only the layers in the slice are touched, and of each torch weight only the rows and
        columns that land in the slice (safetensors slice reads on the memory map), so a device's
        shard of a 20B checkpoint costs its own bytes, not the leaf's. The result is written into
        one preallocated array (cast per layer; `out` when given), never stacked from a second copy.
        """
        entry, fleaf, tleaf = self._leaves[path]
        idx = norm_index(index, self.shape(path))
        layers, inner = (range(*idx[0].indices(self.config.num_layers)), idx[1:]) if entry.stacked else ([None], idx)
        shape = tuple(len(range(*s.indices(n))) for s, n in zip(idx, self.shape(path)))
        dt = np.dtype(as_dtype(dtype)) if dtype is not None else self.dtype(path)
        out = check_out(out, shape, dt, path)
        for i, layer in enumerate(layers):
            self._read_layer(entry, fleaf, tleaf, layer, inner, out[i] if entry.stacked else out)
        return out

    def _read_layer(self, entry: keymap.ModuleEntry, fleaf: str, tleaf: str, layer: int | None,
                    inner: tuple[slice, ...], dest: np.ndarray) -> None:
        """One layer's slice of a Flax leaf (kernel `[in, (3,) out]`, bias `[(3,) out]`, scale) into `dest`."""
        names = keymap.torch_names_for(entry, tleaf, layer)
        if entry.fused:  # the group axis (q|k|v) picks torch tensors
            group = inner[1] if fleaf == "kernel" else inner[0]
            names = names[group]
            inner = (inner[0], inner[2]) if fleaf == "kernel" else inner[1:]
        for j, name in enumerate(names if entry.fused else names[:1]):
            if fleaf == "kernel":  # torch weight [out, in] → Flax [in, out]: the slice, transposed in place
                self.source.read_slice(name, (inner[1], inner[0]), out=dest[:, j] if entry.fused else dest,
                                       transpose=True)
            else:
                self.source.read_slice(name, inner, out=dest[j] if entry.fused else dest)


def local_weights(url: str, *, progress: bool = True) -> str:
    """A local copy of safetensors weights at `url` (`storage.local_copy`: under `$QWEN_EDIT_JAX_CACHE` or
    ~/.cache/qwen_edit_jax, reused while the sizes match): a prefix (diffusers folder) whole; a file with the
    `config.json` beside it, and an index with its whole folder (the shards). A local path is returned as is."""
    if not storage.is_remote(url):
        return os.fspath(url)
    url = storage.normalize(url)
    folder = posixpath.dirname(url)
    if url.endswith(".index.json"):
        return os.path.join(storage.local_copy(folder, progress=progress), posixpath.basename(url))
    local = storage.local_copy(url, progress=progress)
    config = storage.join(folder, "config.json")
    if os.path.isfile(local) and url != config and storage.exists(config):
        storage.local_copy(config, progress=False)
    return local


def open_lazy_params(
    path: str | os.PathLike, config: DiTConfig | str | None = None, *, fuse_qkv: bool = True, stream: bool = False
) -> LazyParams:
    """Open base weights in any supported layout, lazily (see `layout.py`).

    A diffusers folder (config.json + one file, or index + shards), an index, or one safetensors
    file — with diffusers/DiffSynth names, ComfyUI prefixes, or the original merged-QKV PyTorch
    layout — or a merged Orbax checkpoint. `config`: a DiTConfig, a config.json path or a preset
    name; required when no config.json lies beside the weights. `.detected` says what was found.
    `stream`: the caller reads every byte once (the converter), so reads go around the page cache
    (merged: O_DIRECT; safetensors: read ahead, pages dropped after; see `buffers`).
    """

    path = os.fspath(path)
    if storage.is_remote(path) and not is_merged_checkpoint(path):
        if storage.isdir(storage.join(path, PARAMS_DIR)):  # a merged checkpoint without its marker: refused
            read_marker(path)
        path = local_weights(path)
    if is_merged_checkpoint(path):
        if not fuse_qkv:
            raise CheckpointError(f"{path}: a merged checkpoint holds fused QKV params; use fuse_qkv=True")
        cfg = None if config is None else layout.resolve_config(path, config)[0]
        lazy = MergedParams(path, cfg, direct_io=stream)
        lazy.detected = layout.Detected(path, "base", "merged Orbax checkpoint (this project)",
                                        "Flax merged-QKV params", config_source=storage.join(path, "config.json"))
        return lazy
    source, detected = layout.open_torch_source(path)
    source.stream = stream
    cfg, detected.config_source = layout.resolve_config(path, config)
    lazy = TorchLayoutParams(source, cfg, fuse_qkv=fuse_qkv)
    lazy.detected = detected
    return lazy
