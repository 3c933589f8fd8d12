"""Load the Qwen-Image VAE: checkpoint files → key map → the 2D Flax model → devices.

    vae = load_vae("Qwen-Image-Edit/vae", dtype=jnp.bfloat16, mesh=None)
    lat = vae.encode(images)   # [B, 3, H, W] in [-1, 1] → normalised latents [B, 16, H/8, W/8]
    img = vae.decode(lat)      # → [B, 3, H, W] in [-1, 1]

Sources: a diffusers `vae/` folder (config.json + safetensors) of Qwen-Image / -Edit / -2509 / -2511,
or one .safetensors file in diffusers or original Wan-2.1 / ComfyUI naming (detected; a `vae.` or
`first_stage_model.` prefix is stripped). A single file has no config: the released architecture is
assumed unless `config=` says otherwise.

With a mesh, weights are replicated (127M parameters, 45M of them used for images) and every batch
is split over the mesh's batch axes (`data` × `fsdp`, as far as they divide the batch size).

`save_vae(vae, folder)` writes the other way: a diffusers `vae/` folder (config.json + one
safetensors file in diffusers names and torch layout) that diffusers' `AutoencoderKLQwenImage`
and `load_vae` both read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ..config import as_dtype
from ..errors import CheckpointError
from ..models.vae import DEFAULT_ATTENTION, AutoencoderKLQwenImage, VAEConfig, decode_latents, encode_images
from ..parallel import batch_sharding, replicated
from ..utils.files import atomic_path
from ..weights.safetensors_io import SINGLE_NAME, TensorSource
from ..weights.vae_keys import detect_layout, from_flax, match_keys, to_flax, vae_keys
from ..weights.writer import write_safetensors_file


class QwenImageVAE:
    """A VAE ready to run: the nnx `model`, its `config`, jitted channels-first `encode` / `decode`.

    Both calls accept numpy or JAX arrays and return fp32 JAX arrays; each input shape compiles once.
    The parameters are captured here: after changing `model`'s variables, wrap it again.
    """

    def __init__(self, model: AutoencoderKLQwenImage, mesh: Mesh | None = None):
        self.model = model
        self.config: VAEConfig = model.config
        self.mesh = mesh
        self._graphdef, self._state = nnx.split(model)
        self._encode = jax.jit(functools.partial(_encode_fn, self._graphdef), static_argnums=2)
        self._decode = jax.jit(functools.partial(_decode_fn, self._graphdef), static_argnums=2)

    @property
    def dtype(self) -> jnp.dtype:
        return self.model.dtype

    def encode(self, images: Any, *, normalize: bool = True) -> jax.Array:
        """[B, C, H, W] images in [-1, 1] (H, W multiples of 8) → posterior mode [B, z, H/8, W/8],
        normalised `(z − latents_mean) / latents_std` unless `normalize=False`."""
        check_image_shape(np.shape(images), self.config)
        return self._run(self._encode, images, normalize)

    def decode(self, latents: Any, *, normalized: bool = True) -> jax.Array:
        """[B, z, h, w] latents (normalised unless `normalized=False`) → [B, C, 8h, 8w] in [-1, 1]."""
        shape = np.shape(latents)
        if len(shape) != 4 or shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, h, w] (channels first), got {list(shape)}")
        return self._run(self._decode, latents, normalized)

    def lower(self, fn: Literal["encode", "decode"], shape: tuple[int, ...]) -> jax.stages.Lowered:
        """Ahead-of-time lowering of `encode` / `decode` for an fp32 input `shape` (nothing runs):
        `.compile().memory_analysis()` gives the memory a size needs."""
        if fn == "encode":
            check_image_shape(tuple(shape), self.config)
        sharding = batch_sharding(self.mesh, shape[0]) if self.mesh is not None else None
        x = jax.ShapeDtypeStruct(tuple(shape), jnp.float32, sharding=sharding)
        with self._mesh_context():
            return (self._encode if fn == "encode" else self._decode).lower(self._state, x, True)

    def _mesh_context(self) -> contextlib.AbstractContextManager:
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _run(self, fn: Any, x: Any, flag: bool) -> jax.Array:
        if self.mesh is None:
            return fn(self._state, jnp.asarray(x), flag)
        x = jax.device_put(x if isinstance(x, jax.Array) else np.asarray(x), batch_sharding(self.mesh, np.shape(x)[0]))
        with self._mesh_context():
            return fn(self._state, x, flag)


def _encode_fn(graphdef: Any, state: Any, images: jax.Array, normalize: bool) -> jax.Array:
    return encode_images(nnx.merge(graphdef, state), images, normalize)


def _decode_fn(graphdef: Any, state: Any, latents: jax.Array, normalized: bool) -> jax.Array:
    return decode_latents(nnx.merge(graphdef, state), latents, normalized)


def check_image_shape(shape: tuple[int, ...], config: VAEConfig) -> None:
    """Images must be [B, C, H, W] with H and W multiples of the spatial factor (8)."""
    c, f = config.input_channels, config.spatial_factor
    if len(shape) == 5 and shape[2] == 1:
        raise ValueError(f"images must be [B, {c}, H, W]; got the video layout {list(shape)}: drop axis 2")
    if len(shape) != 4 or shape[1] != c:
        raise ValueError(f"images must be [B, {c}, H, W] (channels first, values in [-1, 1]), got {list(shape)}")
    h, w = shape[2:]
    if h % f or w % f:
        raise ValueError(f"image size {h}×{w} (H×W) is not a multiple of {f}, the VAE's spatial factor; resize or "
                         f"crop first (the DiT needs multiples of {2 * f}, the Qwen-Image pipelines use {4 * f})")


# ---- construction --------------------------------------------------------------------------------------
def init_vae(config: VAEConfig | None = None, seed: int = 0, *, dtype: Any = jnp.float32, mesh: Mesh | None = None,
             attention: str = DEFAULT_ATTENTION) -> QwenImageVAE:
    """A randomly initialised VAE (tests, demos, benchmarks): kernels ~ N(0, 1/fan_in), biases 0,
    gammas 1, like the module's own init but drawn on the host with numpy (compiling JAX's RNG for
    the 186 released-size tensors takes 15–25 s on a CPU; numpy takes about one)."""
    config = config or VAEConfig()
    dt = np.dtype(as_dtype(dtype))
    abstract = nnx.eval_shape(lambda: AutoencoderKLQwenImage(config, attention=attention, dtype=dt))
    rng = np.random.default_rng(seed)
    params = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        name, shape = ".".join(map(str, path)), tuple(var.shape)
        if name.endswith(".kernel"):
            value = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = np.full(shape, 1.0 if name.endswith(".gamma") else 0.0, np.float32)
        params[name] = value.astype(dt)
    return QwenImageVAE(_model_from_params(params, config, dt, attention, mesh), mesh)


def load_vae(path: str | os.PathLike, *, dtype: Any = jnp.bfloat16, mesh: Mesh | None = None,
             attention: str = DEFAULT_ATTENTION, config: VAEConfig | Mapping[str, Any] | None = None) -> QwenImageVAE:
    """Load a diffusers `vae/` folder or a single VAE .safetensors file (diffusers or Wan/ComfyUI names).

    `config` overrides the folder's config.json (needed for a single file of a non-released
    architecture). Raises `CheckpointError` naming file and tensor for missing, unexpected or
    misshaped tensors, `ValueError` for a bad config.
    """
    path = os.fspath(path)
    hint = ""
    if config is None:
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, "config.json")):
                raise CheckpointError(f"{path}: no config.json in this VAE folder (pass config= to load_vae)")
            config = VAEConfig.from_json(path)
        else:
            config = VAEConfig()
            hint = "; a single file has no config, so the released architecture was assumed: pass config= for another"
    elif not isinstance(config, VAEConfig):
        config = VAEConfig.from_dict(dict(config), source="config argument")
    return _build(TensorSource.open(path), config, dtype, mesh, attention, path, hint)


def vae_from_tensors(tensors: TensorSource | Mapping[str, np.ndarray], config: VAEConfig | None = None, *,
                     dtype: Any = jnp.bfloat16, mesh: Mesh | None = None, attention: str = DEFAULT_ATTENTION,
                     source: str = "state dict") -> QwenImageVAE:
    """Build the VAE from named tensors in torch layout: a `TensorSource` or a {name: numpy array}
    dict (e.g. a diffusers `state_dict()` converted to numpy); diffusers or Wan/ComfyUI names."""
    src = tensors if isinstance(tensors, TensorSource) else _DictTensors(tensors, source)
    return _build(src, config or VAEConfig(), dtype, mesh, attention, source)


def _build(src: Any, config: VAEConfig, dtype: Any, mesh: Mesh | None, attention: str, source: str,
           hint: str = "") -> QwenImageVAE:
    """Check names and shapes against the key map, convert, and fill the model (errors end with `hint`)."""
    dtype = np.dtype(as_dtype(dtype))
    names = src.keys()
    layout, prefix = detect_layout(names, source)
    matched, missing, extra = match_keys(names, config, layout, prefix)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{src.file_of(extra[0])}: unexpected tensor {extra[0]!r}{more}: not part of "
                              f"AutoencoderKLQwenImage with this config{hint}")
    if missing:
        names_ = [prefix + k.source_name(layout) for k in missing]
        raise CheckpointError(f"{source}: missing tensor {names_[0]!r}"
                              + (f" (and {len(names_) - 1} more: {names_[1:4]}…)" if len(names_) > 1 else "") + hint)
    params: dict[str, np.ndarray] = {}
    for name, key in matched.items():
        shape = tuple(src.shape(name))
        if shape != key.shape:
            raise CheckpointError(f"{src.file_of(name)}: tensor {name!r} has shape {list(shape)}, expected "
                                  f"{list(key.shape)} for this config{hint}")
        if key.flax is not None:
            params[key.flax] = to_flax(key, np.asarray(src.get(name))).astype(dtype)
    return QwenImageVAE(_model_from_params(params, config, dtype, attention, mesh), mesh)


def _model_from_params(params: dict[str, np.ndarray], config: VAEConfig, dtype: np.dtype, attention: str,
                       mesh: Mesh | None) -> AutoencoderKLQwenImage:
    """Fill the abstract model's variables with `params` (dotted Flax path → array); no random init."""
    abstract = nnx.eval_shape(lambda: AutoencoderKLQwenImage(config, attention=attention, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    place = (lambda a: jax.device_put(a, replicated(mesh))) if mesh is not None else jnp.asarray
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = params[".".join(map(str, path))]
        assert value.shape == var.shape, (path, value.shape, var.shape)  # the key map and the model agree
        flat.append((path, var.replace(place(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---- saving ----------------------------------------------------------------------------------------
def vae_params(vae: QwenImageVAE | AutoencoderKLQwenImage) -> dict[str, np.ndarray]:
    """{dotted Flax path: host array} of a VAE's parameters (the names `_model_from_params` takes)."""
    model = vae.model if isinstance(vae, QwenImageVAE) else vae
    return {".".join(map(str, path)): np.asarray(jax.device_get(var[...]))
            for path, var in nnx.to_flat_state(nnx.state(model))}


def save_vae(vae: QwenImageVAE | AutoencoderKLQwenImage | Mapping[str, np.ndarray], folder: str | os.PathLike, *,
             config: VAEConfig | None = None, dtype: Any = None, overwrite: bool = False) -> str:
    """Write a diffusers `vae/` folder: `config.json` + `diffusion_pytorch_model.safetensors` (diffusers
    names, torch layout, unused `time_conv`s as zeros), atomically; returns the folder.

    `vae`: a loaded VAE, its nnx model, or {dotted Flax path: array} (then `config` is required).
    `dtype`: the stored dtype (default: the parameters' own). An existing folder is replaced only with
    `overwrite`.
    """
    if isinstance(vae, (QwenImageVAE, AutoencoderKLQwenImage)):
        config = config or vae.config
        params = vae_params(vae)
    else:
        if config is None:
            raise ValueError("save_vae: pass config= with a dict of parameters")
        params = dict(vae)
    keys = vae_keys(config)
    unknown = sorted(set(params) - {k.flax for k in keys if k.flax is not None})
    missing = [k.flax for k in keys if k.flax is not None and k.flax not in params]
    if unknown or missing:
        raise ValueError(f"save_vae: parameters do not match the config: missing {missing[:3]}, unexpected "
                         f"{unknown[:3]}")
    cast = np.dtype(as_dtype(dtype)) if dtype is not None else np.asarray(next(iter(params.values()))).dtype
    tensors = {k.name: from_flax(k, None if k.flax is None else params[k.flax]).astype(cast) for k in keys}
    out = os.fspath(folder)
    with atomic_path(out, overwrite=overwrite, is_dir=True) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
        write_safetensors_file(os.path.join(tmp, SINGLE_NAME), tensors, metadata={"format": "pt"})
    return out


class _DictTensors:
    """The `TensorSource` reading interface over an in-memory {name: array} dict."""

    def __init__(self, tensors: Mapping[str, Any], description: str):
        self._t, self.description = tensors, description

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self._t[key]))

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self._t[key])

    def file_of(self, key: str) -> str:
        return self.description


def expected_tensors(config: VAEConfig | None = None) -> dict[str, tuple[int, ...]]:
    """{diffusers tensor name: torch shape} for a config (194 tensors for the released VAE)."""
    return {k.name: k.shape for k in vae_keys(config or VAEConfig())}

