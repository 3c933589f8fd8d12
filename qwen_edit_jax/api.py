"""Public entry points: build, load and export `QwenImageTransformer`."""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import DiTConfig, ModelOptions
from .transformer import QwenImageTransformer
from .weights import keymap
from .weights.loader import open_lazy_params, read_all
from .weights.safetensors_io import CheckpointError

LoraSpec = str | os.PathLike | Sequence[Any] | None


def abstract_model(config: DiTConfig, options: ModelOptions | None = None) -> QwenImageTransformer:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory, for shapes, sharding plans, restore targets."""
    return nnx.eval_shape(lambda: QwenImageTransformer(config, options or ModelOptions(), rngs=nnx.Rngs(0)))


def init_transformer(config: DiTConfig, options: ModelOptions | None = None, seed: int = 0) -> QwenImageTransformer:
    """A randomly initialised model (tests, demos)."""
    return QwenImageTransformer(config, options or ModelOptions(), rngs=nnx.Rngs(seed))


def init_lora_state(config: DiTConfig, options: ModelOptions, seed: int = 0) -> nnx.State:
    """Fresh LoRA parameters only; the base-weight initialisation is dead code XLA removes."""
    def make():
        return nnx.state(QwenImageTransformer(config, options, rngs=nnx.Rngs(seed)), nnx.LoRAParam)

    return jax.jit(make)()


def model_from_params(
    config: DiTConfig,
    options: ModelOptions,
    params: dict[str, Any],
    *,
    lora_seed: int = 0,
    source: str = "params",
) -> QwenImageTransformer:
    """Assemble a model from a flat `{flax path: array}` dict of base weights.

    LoRA parameters (if `options.lora` is set) are freshly initialised (A random, B zero).
    """
    graphdef, state = nnx.split(abstract_model(config, options))
    lora = init_lora_state(config, options, lora_seed) if options.lora is not None else None
    lora_flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(lora)} if lora is not None else {}
    missing = []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        if isinstance(var, nnx.LoRAParam):
            var.set_value(lora_flat[key][...])
            continue
        if key not in params:
            missing.append(key)
            continue
        value = params[key]
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointError(f"{source}: parameter {key} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(var.shape)} for this config")
        var.set_value(jnp.asarray(value, dtype=options.param_dtype))
    if missing:
        raise CheckpointError(f"{source}: missing parameters {missing[:5]}{' …' if len(missing) > 5 else ''}")
    return nnx.merge(graphdef, state)


def iter_torch_params(model: QwenImageTransformer) -> Iterator[tuple[str, np.ndarray]]:
    """The model's base weights as (diffusers name, numpy array in torch layout), one at a time."""
    cfg, fuse = model.config, model.options.fuse_qkv
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, entry, fleaf, tleaf in keymap.iter_leaves(cfg, fuse):
        value = np.asarray(flat[path][...])
        for layer in (range(cfg.num_layers) if entry.stacked else [None]):
            v = value if layer is None else value[layer]
            for name, t in zip(keymap.torch_names_for(entry, tleaf, layer), keymap.from_flax_leaf(fleaf, v, len(entry.torch))):
                yield name, t


def load_transformer(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    mesh: Any = None,
    lora: LoraSpec = None,
    options: ModelOptions | None = None,
    config: DiTConfig | None = None,
) -> QwenImageTransformer:
    """Load the transformer from a diffusers folder (config.json + one safetensors file, or shards
    with an index), a single safetensors file with `config=` (also ComfyUI prefixes and the original
    merged-QKV PyTorch layout), or a merged Orbax checkpoint written by `convert/convert_checkpoint.py`.

    `dtype` sets both parameter and activation dtype unless `options` is given. `lora`: a LoRA file
    or a list of paths / (path, strength) pairs in any supported key style, merged into the weights.
    `mesh` (`sharding.make_mesh`): every weight arrives sharded per `sharding.LOGICAL_RULES`, each
    process reading only its own devices' slices (no host ever holds the whole checkpoint).
    """
    options = options or ModelOptions(param_dtype=dtype, dtype=dtype)
    if mesh is not None:  # each device's shard read from disk and placed directly (sharding.load_sharded)
        from .sharding import load_sharded

        model = load_sharded(path, mesh, options=options, config=config)
    else:
        model = _load_base(path, options, config)
    if lora is not None:  # LoRA files of any key style, merged into the base weights (exact in fp32)
        from .lora.io import apply_lora

        apply_lora(model, lora)
    return model


def _load_base(path: str | os.PathLike, options: ModelOptions, config: DiTConfig | None) -> QwenImageTransformer:
    """Base weights from a merged Orbax checkpoint (converter output) or any PyTorch layout."""
    from .weights import checkpoint

    if checkpoint.is_merged_checkpoint(path):
        return checkpoint.load_merged_model(path, options, config=config)
    lazy = open_lazy_params(path, config, fuse_qkv=options.fuse_qkv)
    params = read_all(lazy, options.param_dtype)
    return model_from_params(lazy.config, options, params, source=lazy.description)
