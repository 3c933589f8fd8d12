"""Loading the DiT: checkpoint files (`weights/`) → `QwenImageTransformer` (`models/dit`) → devices (`parallel/`).

Every source — a diffusers folder or file in any PyTorch layout, a merged Orbax checkpoint, or
in-memory arrays — is a `LazyParams`, and every leaf goes to its devices through one
`jax.make_array_from_callback` call: each device's slice is read from disk (cast per layer) and
placed, one leaf at a time. Without a mesh the "mesh" is the first device, so single-host loading
streams too: peak host memory is the placed weights plus one leaf, never the checkpoint twice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, Sharding, SingleDeviceSharding
from tqdm.auto import tqdm

from ..config import DiTConfig, ModelOptions
from ..errors import CheckpointError
from ..lora.merge import apply_lora
from ..lora.plan import resolve_options
from ..models.dit import (
    ADAPTER_STATE,
    BASE_PARAMS,
    QwenImageTransformer,
    abstract_model,
    fresh_lora_state,
    init_dora_magnitudes,
)
from ..models.offload import HOST, is_offloaded
from ..parallel import param_shardings
from ..weights.checkpoint import SCALE_SUFFIX  # a quantized `….kernel` has its scales at `….kernel_scale`
from ..weights.lazy import ArrayParams, LazyParams, check_params
from ..weights.loader import open_lazy_params
from ..weights.torch_layout import iter_standard_tensors, save_standard
from .quantized import QuantizedParams

LoraSpec = str | os.PathLike | Sequence[Any] | None


def _flat(state: Any) -> dict[str, Any]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _shardings(state: nnx.State, mesh: Mesh | None) -> dict[str, Sharding]:
    """Each variable's target sharding: `LOGICAL_RULES` on a mesh, else the first local device."""
    if mesh is None:
        one = SingleDeviceSharding(jax.local_devices()[0])
        return {k: one for k in _flat(state)}
    return {k: v.get_value() for k, v in _flat(param_shardings(state, mesh)).items()}


def array_from_lazy(lazy: LazyParams, path: str, sharding: Sharding, dtype: Any) -> jax.Array:
    """One parameter as a `jax.Array` in `sharding`, each device's slice read straight from the source.

    The callback runs once per addressable device with that device's index; devices holding the
    same slice (replicas) share one read. No host holds more than its own devices' slices.
    """
    cache: dict[tuple, np.ndarray] = {}

    def cb(index: tuple[slice, ...] | None) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index or ())
        if key not in cache:
            cache[key] = lazy.read(path, index, dtype=dtype)
        return cache[key]

    return jax.make_array_from_callback(tuple(lazy.shape(path)), sharding, cb)


def init_lora(model: QwenImageTransformer, mesh: Mesh | None, seed: int = 0) -> None:
    """Give `model` fresh adapters (A random, B zero, DoRA magnitudes = the base's row norms), computed on device
    already in their shardings."""
    abstract = nnx.state(abstract_model(model.config, model.options), ADAPTER_STATE)
    out_sh = param_shardings(abstract, mesh) if mesh is not None else None
    make = jax.jit(lambda: fresh_lora_state(model.config, model.options, seed), out_shardings=out_sh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        nnx.update(model, make())
        init_dora_magnitudes(model)


def place_params(lazy: LazyParams, options: ModelOptions, *, mesh: Mesh | None = None, lora_seed: int = 0,
                 progress: bool = True) -> QwenImageTransformer:
    """Build the model from `lazy`, every base weight streamed to its devices; fresh LoRA if `options.lora`.

    With `options.quantize`, a float source is read through `loading.quantized.QuantizedParams`: each block
    kernel is quantized one layer at a time on the device and placed as int8 / fp8 / int4 values + scales,
    so peak device memory is the quantized model plus one float layer. A source that already holds
    `….kernel_scale` (a quantized merged checkpoint) is read as stored, bit for bit; its mode must equal
    `options.quantize`. With `options.offload="base"` the blocks' frozen leaves are placed in host memory
    (`models.offload.is_offloaded`).
    """
    options = resolve_options(options, lazy.config)  # per-layer adapter plan from lora include/exclude/patterns
    model = abstract_model(lazy.config, options)
    graphdef, state = nnx.split(model)
    base = {k: v for k, v in _flat(state).items() if isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam)}
    scales = {k for k in base if k.endswith(".kernel" + SCALE_SUFFIX)}
    pre_quantized = any(p.endswith(".kernel" + SCALE_SUFFIX) for p in lazy.paths())
    if pre_quantized and not scales:
        raise CheckpointError(f"{lazy.description}: holds quantized kernels; load it with quantize= "
                              f"(ModelOptions.quantize) set to the checkpoint's mode")
    if scales and not pre_quantized:
        check_params(lazy.description, {p: lazy.shape(p) for p in lazy.paths()},
                     {k: v.shape for k, v in base.items() if k not in scales})
        lazy = QuantizedParams(lazy, options.quantize)
    check_params(lazy.description, {p: lazy.shape(p) for p in lazy.paths()}, {k: v.shape for k, v in base.items()})
    shardings = _shardings(state, mesh)
    if options.offload == "base":
        shardings = {k: s.with_memory_kind(HOST) if k in base and is_offloaded(k) else s
                     for k, s in shardings.items()}
    show = progress and jax.process_index() == 0 and len(base) > 50
    for key, var in tqdm(base.items(), desc="load", unit="leaf", disable=not show):
        if key in scales:
            dtype = np.float32
        elif key + SCALE_SUFFIX in scales:
            if np.dtype(lazy.dtype(key)) != np.dtype(var.dtype):
                raise CheckpointError(f"{lazy.description}: {key} is stored as {np.dtype(lazy.dtype(key))}, "
                                      f"quantize={options.quantize!r} needs {np.dtype(var.dtype)}")
            dtype = None
        else:
            dtype = options.param_dtype
        var.set_value(array_from_lazy(lazy, key, shardings[key], dtype))
    model = nnx.merge(graphdef, state)
    if options.lora is not None:
        init_lora(model, mesh, lora_seed)
    return model


def load_transformer(
    path: str | os.PathLike,
    *,
    dtype: Any = np.float32,
    mesh: Mesh | None = None,
    lora: LoraSpec = None,
    options: ModelOptions | None = None,
    config: DiTConfig | str | None = None,
    lora_seed: int = 0,
    progress: bool = True,
) -> QwenImageTransformer:
    """Load the transformer from a diffusers folder (config.json + one safetensors file, or shards
    with an index), a single safetensors file with `config=` (also ComfyUI prefixes and the original
    merged-QKV PyTorch layout), or a merged Orbax checkpoint written by `convert/convert_checkpoint.py`.

    `dtype` sets both parameter and activation dtype unless `options` is given. `lora`: a LoRA file
    or a list of paths / (path, strength) pairs in any supported key style, merged into the weights.
    `mesh` (`parallel.make_mesh`): every weight arrives sharded per `parallel.LOGICAL_RULES`, each
    process reading only its own devices' slices. Trainable adapters (`options.lora`) are created
    once, on device, in their shardings (`lora_seed`).
    """
    options = options or ModelOptions(param_dtype=dtype, dtype=dtype)
    if lora is not None and options.quantize:
        raise ValueError("lora= merges files into the base weights, which a quantized base cannot take; "
                         "load the float base with lora=, or train a LoRA on the quantized base")
    if lora is not None and options.offload == "base":
        raise ValueError("lora= merges files into the base weights on the device, which an offloaded base "
                         "(offload='base') keeps in host memory; load the LoRA as adapters instead "
                         "(options.lora + lora.adapters.load_lora_into_adapters)")
    lazy = open_lazy_params(path, config, fuse_qkv=options.fuse_qkv)
    model = place_params(lazy, options, mesh=mesh, lora_seed=lora_seed, progress=progress)
    if lora is not None:  # LoRA files of any key style, merged into the base weights (exact in fp32)
        apply_lora(model, lora)
    return model


def model_from_params(config: DiTConfig, options: ModelOptions, params: Mapping[str, Any], *, lora_seed: int = 0,
                      source: str = "params", mesh: Mesh | None = None) -> QwenImageTransformer:
    """A model from a flat `{flax path: array}` dict of base weights (fresh LoRA if `options.lora`)."""
    lazy = ArrayParams(params, config, fuse_qkv=options.fuse_qkv, description=source)
    return place_params(lazy, options, mesh=mesh, lora_seed=lora_seed, progress=False)


def model_params(model: QwenImageTransformer) -> ArrayParams:
    """The model's base weights as a `LazyParams` (for export; arrays spread over hosts are gathered per slice)."""
    flat = {k: v.get_value() for k, v in _flat(nnx.state(model, BASE_PARAMS)).items()}
    return ArrayParams(flat, model.config, fuse_qkv=model.options.fuse_qkv, description="model")


def _no_quantized_export(model: QwenImageTransformer) -> None:
    if model.options.quantize:
        raise ValueError(f"the model's base is quantized ({model.options.quantize}); the diffusers / torch layouts "
                         f"hold float weights: export from the float checkpoint instead")


def iter_torch_params(model: QwenImageTransformer) -> Iterator[tuple[str, np.ndarray]]:
    """The model's base weights as (diffusers name, numpy array in torch layout), one at a time."""
    _no_quantized_export(model)
    return iter_standard_tensors(model_params(model))


def save_transformer(model: QwenImageTransformer, path: str | os.PathLike, **kwargs: Any) -> str:
    """Write the model's base weights as a diffusers transformer folder (`format="comfyui"`: one file).

    Keyword arguments as `weights.torch_layout.save_standard` (dtype, overwrite, max_shard_size, progress).
    """
    _no_quantized_export(model)
    kwargs.setdefault("progress", False)
    return save_standard(model_params(model), path, **kwargs)
