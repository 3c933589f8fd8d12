"""Load the Qwen2.5-VL encoder from a transformers `text_encoder/` folder into `Qwen25VLEncoder`.

The folder holds `config.json` and either `model.safetensors.index.json` + shards or one
`model.safetensors` (any other set of `*.safetensors` files is read as one checkpoint too), in
the transformers-5 or the legacy key layout (`weights/text_encoder_keys.py`). Weights are
streamed leaf by leaf; with a mesh each device's shard is read straight from the memory-mapped
files (`jax.make_array_from_callback`), so no host holds the checkpoint, or a whole stacked
leaf, more than once. Missing, unexpected or misshaped tensors raise `CheckpointError` naming
the file and key before anything is read.

`load_text_encoder` loads a whole diffusers Qwen-Image(-Edit) repo folder — `text_encoder/` plus
`tokenizer/` (t2i) and/or `processor/` (edit variants) — as a `QwenPromptEncoder`
(`encoding.py`), whose `encode_prompt` equals the pipelines' own.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from ..config import as_dtype, read_json_config
from ..encoding import QwenPromptEncoder, check_tokenizer
from ..errors import CheckpointError
from ..models.kernels import get_attention
from ..models.quant import reduced_axis
from ..models.text_encoder import EncoderOptions, Qwen25VLConfig, Qwen25VLEncoder
from ..parallel import param_shardings
from ..preprocess import QwenImageProcessor, QwenTokenizer, QwenVLProcessor
from ..weights import text_encoder_keys as keys
from ..weights.checkpoint import SCALE_SUFFIX  # a quantized `….kernel` has its scales at `….kernel_scale`
from ..weights.safetensors_io import CheckpointError as SourceError
from ..weights.safetensors_io import TensorSource, np_dtype
from .quant_leaf import leaf_quantizer, read_dtype

DEFAULT_ATTENTION = "auto"  # vision tower kernel: splash (TPU), cudnn (GPU, half precision), else flash
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}


def read_text_encoder_config(folder: str | os.PathLike) -> Qwen25VLConfig:
    """`Qwen25VLConfig` from `folder/config.json` (either transformers layout)."""
    path = os.path.join(os.fspath(folder), "config.json")
    try:
        raw, path = read_json_config(path, "text encoder config (a transformers text_encoder folder has config.json)")
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    try:
        return Qwen25VLConfig.from_dict(raw, source=path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def open_text_encoder_source(folder: str | os.PathLike) -> TensorSource:
    """The folder's tensors: through the index if there is one, else `model.safetensors`, else all files."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder (expected a transformers text_encoder folder)")
    index = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index):
        return TensorSource.from_index(index)
    single = os.path.join(folder, SINGLE_NAME)
    return TensorSource.open(single if os.path.exists(single) else folder)


def validate_source(source: TensorSource, config: Qwen25VLConfig) -> str:
    """Check names, shapes and dtypes against `config`; returns the key layout."""
    names = [k for k in source.keys() if k not in keys.IGNORED]
    try:
        layout = keys.detect_layout(names)
    except ValueError as e:
        raise CheckpointError(f"{source.description}: {e}") from None
    expected = keys.checkpoint_shapes(config, layout)
    missing = sorted(set(expected) - set(names))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source.description}: missing tensors {missing[:3]}{more} ({layout} layout; does "
                              f"config.json match the weights?)")
    extra = sorted(set(names) - set(expected))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"{source.file_of(extra[0])}: unexpected tensor {extra[0]!r}{more} ({layout} layout; "
                              f"does config.json match the weights?)")
    for name, shape in expected.items():
        got = tuple(source.shape(name))
        if got != shape:
            raise CheckpointError(f"{source.file_of(name)}: tensor {name!r} has shape {list(got)}, config.json "
                                  f"implies {list(shape)}")
        if source.dtype(name) not in _FLOAT_DTYPES:
            raise CheckpointError(f"{source.file_of(name)}: tensor {name!r} has dtype {source.dtype(name)}, "
                                  f"expected a float type")
    return layout


def abstract_text_encoder(config: Qwen25VLConfig, options: EncoderOptions) -> Qwen25VLEncoder:
    """The model with `ShapeDtypeStruct` leaves (no memory): shapes, sharding plans, load targets."""
    return nnx.eval_shape(lambda: Qwen25VLEncoder(config, options, rngs=nnx.Rngs(0)))


def _place(source: TensorSource, entry: keys.KeyEntry, layout: str, shape: tuple[int, ...], dtype: np.dtype,
           sharding: Any) -> jax.Array:
    if sharding is None:
        return jnp.asarray(keys.read_leaf(source, entry, layout, dtype=dtype))
    cache: dict[tuple, np.ndarray] = {}

    def cb(index):
        k = tuple((s.start, s.stop, s.step) for s in index)
        if k not in cache:  # replicas share one read
            cache[k] = keys.read_leaf(source, entry, layout, index, dtype=dtype)
        return cache[k]

    return jax.make_array_from_callback(shape, sharding, cb)


def load_text_encoder_model(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
    options: EncoderOptions | None = None,
    quantize: str | None = None,
) -> Qwen25VLEncoder:
    """`Qwen25VLEncoder` with the weights of a transformers `text_encoder/` folder.

    dtype: weights and activations (ignored when `options` is given). mesh: shard every weight
    over it by its logical axes (`parallel.LOGICAL_RULES`: FSDP on the model width, tensor
    parallel on heads / MLP width); None places the weights on the default device. quantize
    ("int8" / "fp8", ignored when `options` is given; `EncoderOptions.quantize`): each large kernel
    is read in its stored dtype, quantized on its devices and the float copy dropped before the next
    leaf, so the float model is never whole on the device.
    """
    config = read_text_encoder_config(path)
    options = options or EncoderOptions(dtype=as_dtype(dtype), param_dtype=as_dtype(dtype), quantize=quantize)
    try:
        source = open_text_encoder_source(path)
        layout = validate_source(source, config)
        graphdef, state = nnx.split(abstract_text_encoder(config, options))
        flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
        shardings = None
        if mesh is not None:
            shardings = {".".join(map(str, p)): v.get_value()
                         for p, v in nnx.to_flat_state(param_shardings(state, mesh))}
        one = SingleDeviceSharding(jax.local_devices()[0])
        by_path = {e.flax: e for e in keys.entries(config)}
        for flax_path, var in flat.items():
            if flax_path.endswith(SCALE_SUFFIX):
                continue  # placed with its kernel
            entry = by_path[flax_path]
            name = entry.checkpoint_name(layout, 0 if entry.layers else None)
            shape = keys.flax_shape(entry, source.shape(name))
            if shape != tuple(var.shape):  # config/key-map disagreement: a bug, not a user error
                raise CheckpointError(f"{source.description}: {flax_path} would be {shape}, the model has "
                                      f"{tuple(var.shape)}")
            sharding = None if shardings is None else shardings[flax_path]
            scale = flat.get(flax_path + SCALE_SUFFIX)
            if scale is None:
                var.set_value(_place(source, entry, layout, shape, np.dtype(options.param_dtype), sharding))
                continue
            s_sharding = one if shardings is None else shardings[flax_path + SCALE_SUFFIX]
            w = _place(source, entry, layout, shape, read_dtype(np_dtype(source.dtype(name)), np.float32),
                       sharding)
            axis = reduced_axis(tuple(var.shape), tuple(scale.shape))
            q, sc = leaf_quantizer(options.quantize, axis, sharding or one, s_sharding)(w)
            del w
            var.set_value(q)
            scale.set_value(sc)
    except CheckpointError:
        raise
    except SourceError as e:  # safetensors_io still defines its own CheckpointError class
        raise CheckpointError(str(e)) from None
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# a whole repo: text_encoder/ + tokenizer/ + processor/
# ---------------------------------------------------------------------------------------------
def read_processor(folder: str, *, images: bool) -> QwenVLProcessor:
    """The tokenizer of `folder` and, with `images`, its `preprocessor_config.json` (class defaults otherwise:
    the t2i pipeline's `tokenizer/` never processes images)."""
    if images and not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        raise CheckpointError(f"{os.path.join(folder, 'preprocessor_config.json')}: file not found (a diffusers "
                              f"processor/ folder holds the Qwen2-VL image processor config)")
    try:
        tokenizer = QwenTokenizer.from_folder(folder)
        image_processor = QwenImageProcessor.from_folder(folder) if images else QwenImageProcessor()
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: cannot read the tokenizer / image processor ({e})") from None
    return QwenVLProcessor(tokenizer, image_processor)


def load_text_encoder(
    repo_dir: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
    attention: str = DEFAULT_ATTENTION,
    quantize: str | None = None,
) -> QwenPromptEncoder:
    """The prompt encoder of a diffusers Qwen-Image / Qwen-Image-Edit(-2509/-2511) repo folder.

    Reads `text_encoder/` (weights, streamed and sharded over `mesh` as `load_text_encoder_model`),
    `tokenizer/` (t2i) and `processor/` (edit, edit_plus); at least one of the last two must exist.
    dtype: weights and activations. attention: the vision tower's kernel (`models.kernels`; the
    language model's causal attention is plain XLA). quantize: "int8" / "fp8" weight-only large
    linear kernels, quantized on load leaf by leaf (`EncoderOptions.quantize`; the 7B encoder fits a
    16 GB chip). Raises `CheckpointError` naming the missing or broken path.
    """
    get_attention(attention)  # an unknown kernel name fails before any weight is read
    dt = as_dtype(dtype)
    options = EncoderOptions(dtype=dt, param_dtype=dt, attention=attention, quantize=quantize)  # validates first
    repo = os.fspath(repo_dir)
    if not os.path.isdir(repo):
        raise CheckpointError(f"{repo}: not a folder (expected a diffusers Qwen-Image(-Edit) repo with text_encoder/, "
                              f"tokenizer/, processor/)")
    te = os.path.join(repo, "text_encoder")
    if not os.path.isdir(te):
        raise CheckpointError(f"{te}: folder not found (a diffusers Qwen-Image repo holds the Qwen2.5-VL weights "
                              f"there)")
    tok_dir, proc_dir = os.path.join(repo, "tokenizer"), os.path.join(repo, "processor")
    if not os.path.isdir(tok_dir) and not os.path.isdir(proc_dir):
        raise CheckpointError(f"{repo}: neither tokenizer/ nor processor/ found (t2i reads tokenizer/, the edit "
                              f"pipelines processor/)")
    t2i = read_processor(tok_dir, images=False) if os.path.isdir(tok_dir) else None
    processor = read_processor(proc_dir, images=True) if os.path.isdir(proc_dir) else None
    config = read_text_encoder_config(te)
    for folder, proc in ((tok_dir, t2i), (proc_dir, processor)):
        if proc is not None:
            try:
                check_tokenizer(proc, config, folder)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
    model = load_text_encoder_model(te, mesh=mesh, options=options)
    return QwenPromptEncoder(model, processor=processor, t2i_processor=t2i, mesh=mesh)
