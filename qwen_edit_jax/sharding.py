"""Meshes, the logical→mesh sharding table, and sharded placement of weights, LoRA, optimizer state and batches.

Parameters carry logical axis names in the model code (`out_sharding` metadata: 'layers', 'embed',
'heads', 'qkv', 'mlp', 'mod', None). One table, `LOGICAL_RULES`, maps them to the three mesh axes
`('data', 'fsdp', 'tensor')`:

- FSDP (ZeRO-3): every weight is split on its model-width (`embed`) axis over `fsdp`; XLA
  all-gathers one layer's weights inside the scan just before use.
- Tensor parallelism: attention heads, the MLP hidden width and the adaLN modulation outputs are
  split over `tensor` (Megatron pattern: column-parallel in, row-parallel out).
- Data parallelism: a batch is split over `data × fsdp` (FSDP is data parallel for activations).
- `qkv` (the q|k|v group of the fused projections) and `layers` stay whole.

FSDP covers every sizeable array (`param_spec`): when the table leaves `fsdp` unused — LoRA B
`[r, heads]`, a fused bias `[3, heads]` on a mesh without tensor parallelism — the largest free
dimension it divides is split on `fsdp` (never `layers`). LoRA adapters follow their base weight's
names (A on the input width, B on the output width), so they and their Adam moments are sharded
too: at rank 32 on all block linears they are 212 M fp32 values, 3.4 GB with gradients and Adam
state, which replicated would eat a quarter of a v5e chip.

A dimension that the mapped mesh axes do not divide is left whole (replicated) rather than padded,
so tiny test configs run on any mesh, and a batch smaller than data × fsdp is replicated.

Everything that traces the model under a mesh must do so in `jax.set_mesh(mesh)` (`sharded_jit`
does it), so that activation constraints and the splash kernel's `shard_map` see the mesh;
without a mesh they are no-ops.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None

# logical axis name → mesh axis (or axes, outermost first, or None = never split)
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),  # activations: samples over data × fsdp
    ("embed", "fsdp"),  # weights: model width (3072) over fsdp
    ("heads", "tensor"),  # attention heads (q/k/v outputs, to_out inputs)
    ("mlp", "tensor"),  # MLP hidden width (12288)
    ("mod", "tensor"),  # adaLN modulation outputs (6·3072)
    ("qkv", None),  # the q|k|v group axis of fused projections
    ("layers", None),  # stacked blocks: the scan walks this axis
    ("seq", None),  # activation sequence length (no sequence parallelism)
)


# ----------------------------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------------------------
def resolve_mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """Fill the one -1 with the remaining devices and check the product is the device count."""
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): at most one size may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): {n_devices} devices are not "
                             f"divisible by the fixed sizes' product {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) needs {math.prod(sizes)} devices, "
                         f"but {n_devices} are available; use -1 for one axis to take the rest")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'tensor') over `devices` (default: all devices, all hosts).

    Axis types are Auto (GSPMD propagation, `with_sharding_constraint` allowed). On TPU the device
    order follows the physical torus (`mesh_utils.create_device_mesh`), so `tensor` (innermost) and
    `fsdp` get the fastest links.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception:  # CPU / GPU / unusual topologies: plain row-major order
        grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_axes_for(mesh: Mesh, batch_size: int | None = None) -> tuple[str, ...]:
    """The batch mesh axes (data, fsdp) that a batch of `batch_size` can be split over.

    Axes are dropped from the inside out until their product divides the batch (a batch of 1 on
    8 chips is replicated: every chip computes it, FSDP still splits the weights).
    """
    shape = dict(mesh.shape)
    axes = [a for a in BATCH_AXES if shape.get(a, 1) > 1]
    if batch_size is not None:
        while axes and batch_size % math.prod(shape[a] for a in axes):
            axes.pop()
    return tuple(axes)


def _entry(axes: Sequence[str]) -> MeshAxes:
    axes = tuple(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


# ----------------------------------------------------------------------------------------------
# Logical names → PartitionSpec
# ----------------------------------------------------------------------------------------------
def logical_to_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Iterable[tuple[str, MeshAxes]] = LOGICAL_RULES,
) -> P:
    """Map logical axis names to a `PartitionSpec`.

    Each mesh axis is used at most once per array (first come, first served). With `shape` and
    `mesh`, mesh axes of size 1 are dropped and an axis whose mesh product does not divide the
    dimension is left unsplit.
    """
    if not logical:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        cand = [target] if isinstance(target, str) else list(target or ())
        cand = [a for a in cand if a not in used]
        if mesh is not None:
            cand = [a for a in cand if mesh.shape[a] > 1]
            if shape is not None:
                while cand and shape[i] % math.prod(mesh.shape[a] for a in cand):
                    cand.pop()
        used.update(cand)
        out.append(_entry(cand))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


FSDP_MIN_SIZE = 2**16  # arrays smaller than this stay replicated when no logical rule splits them on fsdp


def param_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Iterable[tuple[str, MeshAxes]] = LOGICAL_RULES,
) -> P:
    """`logical_to_spec`, then FSDP for every sizeable weight: if the rules left `fsdp` unused
    (e.g. LoRA B `[r, heads]`, a fused bias `[3, heads]` on a pure-FSDP mesh), split the largest
    free dimension it divides — never the `layers` axis the scan walks."""
    spec = list(logical_to_spec(logical, shape, mesh, rules))
    spec += [None] * (len(shape) - len(spec))
    n_fsdp = dict(mesh.shape).get("fsdp", 1)
    used = {a for e in spec for a in ((e,) if isinstance(e, str) else (e or ()))}
    if n_fsdp > 1 and "fsdp" not in used and math.prod(shape) >= FSDP_MIN_SIZE:
        logical = tuple(logical or ()) + (None,) * (len(shape) - len(tuple(logical or ())))
        free = [i for i, (e, name) in enumerate(zip(spec, logical))
                if e is None and name != "layers" and shape[i] % n_fsdp == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    return var.get_metadata().get("out_sharding")


def param_shardings(state_or_model: Any, mesh: Mesh, rules: Iterable[tuple[str, MeshAxes]] = LOGICAL_RULES) -> Any:
    """`NamedSharding`s for every variable of a model / `nnx.State` (concrete or abstract).

    Returns a tree with the structure of `nnx.state(model)` (or of the given state), whose leaves
    are the shardings: usable as `jax.jit` in/out shardings and with `jax.device_put`.
    """
    rules = tuple(rules)
    state = nnx.state(state_or_model) if isinstance(state_or_model, nnx.Module) else state_or_model

    def one(v: Any) -> Any:
        if _is_var(v):
            return v.replace(NamedSharding(mesh, param_spec(_logical_axes(v), v.shape, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=_is_var)


def param_specs(state_or_model: Any, mesh: Mesh) -> dict[str, P]:
    """{dotted flax path: PartitionSpec} (for reports and tests)."""
    sh = param_shardings(state_or_model, mesh)
    return {".".join(map(str, p)): v.get_value().spec for p, v in nnx.to_flat_state(sh)}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_size: int | None = None) -> NamedSharding:
    """Sharding of a batch array: leading (sample) axis over data × fsdp, the rest whole."""
    return NamedSharding(mesh, P(_entry(batch_axes_for(mesh, batch_size))))


def like_params(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that embeds copies of `params` (optimizer state: Adam's mu and nu …).

    Every subtree with the exact structure of `params` gets `shardings`; every other leaf
    (step counters, scalars) is replicated. Use on `jax.eval_shape(tx.init, params)`.
    """
    struct = jax.tree.structure(params)

    def is_param_like(x: Any) -> bool:
        try:
            return jax.tree.structure(x) == struct
        except Exception:
            return False

    def one(sub: Any) -> Any:
        if is_param_like(sub):
            return shardings
        return jax.tree.map(lambda _: replicated(mesh), sub)

    return jax.tree.map(one, tree, is_leaf=is_param_like)


def init_opt_state(tx: Any, params: Any, mesh: Mesh) -> Any:
    """`tx.init(params)` computed on-device with every moment placed like its (sharded) parameter."""
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    out_sh = like_params(jax.eval_shape(tx.init, params), params, p_sh, mesh)
    with jax.set_mesh(mesh):
        return jax.jit(tx.init, out_shardings=out_sh)(params)


def _shard_leaves(tree: Any, shardings: Any) -> Any:
    return jax.device_put(tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move every variable of `model` onto `mesh` per `LOGICAL_RULES`, in place; returns `model`."""
    state = nnx.state(model)
    nnx.update(model, _shard_leaves(state, param_shardings(state, mesh)))
    return model


def is_sharded(x: jax.Array) -> bool:
    """True if no device holds all of `x` (it really is split)."""
    return any(s.data.shape != x.shape for s in x.addressable_shards)


# ----------------------------------------------------------------------------------------------
# Tracing under a mesh
# ----------------------------------------------------------------------------------------------
def current_mesh():
    """The mesh set by `jax.set_mesh` (an AbstractMesh while tracing) or None."""
    m = jax.sharding.get_abstract_mesh()
    return None if m is None or m.empty else m


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh; a no-op without one."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


class sharded_jit:
    """`jax.jit` with explicit in/out shardings whose tracing (call, `lower`) runs in `jax.set_mesh(mesh)`."""

    def __init__(self, fn: Callable, mesh: Mesh, *, in_shardings: Any, out_shardings: Any,
                 donate_argnums: int | Sequence[int] = (), static_argnums: int | Sequence[int] = ()):
        self.mesh = mesh
        self._jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                               donate_argnums=donate_argnums, static_argnums=static_argnums)
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(*args, **kwargs)


def sharded_forward(model: nnx.Module, mesh: Mesh, img_shapes: Any) -> Callable[..., jax.Array]:
    """`f(hidden_states, encoder_hidden_states, mask, timestep) -> out` jitted over `mesh`.

    The model must already be placed (`shard_model` or `load_transformer(mesh=)`); inputs are
    split over the batch axes, the output comes back the same way.
    """
    graphdef, state = nnx.split(model)
    state_sh = param_shardings(state, mesh)

    def fwd(state, hidden, enc, mask, sigma):
        m = nnx.merge(graphdef, state)
        return m(hidden_states=hidden, encoder_hidden_states=enc, encoder_hidden_states_mask=mask,
                 timestep=sigma, img_shapes=img_shapes)

    cache: dict[Any, sharded_jit] = {}

    def call(hidden, enc, mask=None, sigma=None):
        b = hidden.shape[0]
        key = (b, mask is None)
        if key not in cache:
            bs = batch_sharding(mesh, b)
            cache[key] = sharded_jit(fwd, mesh, in_shardings=(state_sh, bs, bs, None if mask is None else bs, bs),
                                     out_shardings=bs)
        return cache[key](state, hidden, enc, mask, sigma)

    return call


# ----------------------------------------------------------------------------------------------
# Abstract (shape-only) sharded state: memory plans, AOT compiles, restore targets
# ----------------------------------------------------------------------------------------------
def abstract_state(model_abs: nnx.Module, mesh: Mesh) -> tuple[Any, Any]:
    """(graphdef, state of `jax.ShapeDtypeStruct`s carrying their `NamedSharding`s)."""
    graphdef, state = nnx.split(model_abs)
    sh = param_shardings(state, mesh)
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, sh)


# ----------------------------------------------------------------------------------------------
# Sharded loading
# ----------------------------------------------------------------------------------------------
def _index_key(index: tuple[slice, ...] | None) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index or ())


def array_from_lazy(lazy: Any, path: str, sharding: NamedSharding, dtype: Any) -> jax.Array:
    """One parameter as a global `jax.Array`, each device's shard read straight from disk.

    The callback runs once per addressable device with that device's index; devices holding the
    same slice (replicas) share one host read. No host ever holds more than its own shards.
    """
    shape = tuple(lazy.shape(path))
    cache: dict[tuple, np.ndarray] = {}

    def cb(index):
        k = _index_key(index)
        if k not in cache:
            cache[k] = lazy.read(path, index, dtype=dtype)
        return cache[k]

    return jax.make_array_from_callback(shape, sharding, cb)


def load_sharded(
    path: Any,
    mesh: Mesh,
    *,
    options: Any,
    config: Any = None,
    lora_seed: int = 0,
    progress: bool = True,
) -> nnx.Module:
    """`load_transformer(path, mesh=mesh)`: build the model with every weight placed on its devices.

    Diffusers folders / safetensors are read per shard (`LazyParams.read(path, index)`); a
    converter-written merged Orbax checkpoint is restored straight into the target shardings.
    LoRA adapters (when `options.lora`) are initialised on-device, already sharded.
    """
    from .weights.loader import open_lazy_params

    merged = _merged_checkpoint_loader(path)
    if merged is not None:
        return merged(path, mesh, options=options, config=config, lora_seed=lora_seed)
    lazy = open_lazy_params(path, config, fuse_qkv=options.fuse_qkv)
    return place_lazy_params(lazy, mesh, options=options, lora_seed=lora_seed, progress=progress)


def place_lazy_params(lazy: Any, mesh: Mesh, *, options: Any, lora_seed: int = 0, progress: bool = True) -> nnx.Module:
    """Assemble a sharded model from a `LazyParams` source (one `make_array_from_callback` per leaf)."""
    from tqdm.auto import tqdm

    from .api import abstract_model
    from .weights.safetensors_io import CheckpointError

    graphdef, state = nnx.split(abstract_model(lazy.config, options))
    shardings = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(param_shardings(state, mesh))}
    available = set(lazy.paths())
    flat = list(nnx.to_flat_state(state))
    base = [(p, v) for p, v in flat if not isinstance(v, nnx.LoRAParam)]
    missing = [".".join(map(str, p)) for p, _ in base if ".".join(map(str, p)) not in available]
    if missing:
        more = " …" if len(missing) > 5 else ""
        raise CheckpointError(f"{lazy.description}: missing parameters {missing[:5]}{more}")
    show = progress and jax.process_index() == 0
    for p, var in tqdm(base, desc="load (sharded)", unit="leaf", disable=not show):
        key = ".".join(map(str, p))
        if tuple(lazy.shape(key)) != tuple(var.shape):
            raise CheckpointError(f"{lazy.description}: parameter {key} has shape {tuple(lazy.shape(key))}, "
                                  f"expected {tuple(var.shape)} for this config")
        var.set_value(array_from_lazy(lazy, key, shardings[key], options.param_dtype))
    if options.lora is not None:
        _init_lora_sharded(state, lazy.config, options, mesh, lora_seed)
    return nnx.merge(graphdef, state)


def _init_lora_sharded(state: Any, config: Any, options: Any, mesh: Mesh, seed: int) -> None:
    """Fill the LoRAParam variables of `state` with a fresh init computed directly in its shardings."""
    from .api import abstract_model
    from .transformer import QwenImageTransformer

    sh = param_shardings(nnx.state(abstract_model(config, options), nnx.LoRAParam), mesh)

    def make():
        return nnx.state(QwenImageTransformer(config, options, rngs=nnx.Rngs(seed)), nnx.LoRAParam)

    with jax.set_mesh(mesh):
        lora = jax.jit(make, out_shardings=sh)()
    values = {p: v for p, v in nnx.to_flat_state(lora)}
    for p, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.LoRAParam):
            var.set_value(values[p].get_value())


def _merged_checkpoint_loader(path: Any) -> Callable | None:
    """The converter's merged-Orbax loader, when `path` is such a checkpoint (else None)."""
    from .weights import checkpoint as ckpt

    if not ckpt.is_merged_checkpoint(path):
        return None

    def load(path, mesh, *, options, config, lora_seed):
        """Orbax restores every leaf straight into its target sharding (each host reads its slices)."""
        from .api import abstract_model

        cfg = ckpt.read_merged_config(path, config)
        graphdef, state = nnx.split(abstract_model(cfg, options))
        shardings = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(param_shardings(state, mesh))}
        base = [(".".join(map(str, p)), var) for p, var in nnx.to_flat_state(state)
                if not isinstance(var, nnx.LoRAParam)]
        target = {k: jax.ShapeDtypeStruct(var.shape, options.param_dtype, sharding=shardings[k]) for k, var in base}
        restored = ckpt.load_merged_params(path, target)
        for k, var in base:
            var.set_value(restored[k])
        if options.lora is not None:
            _init_lora_sharded(state, cfg, options, mesh, lora_seed)
        return nnx.merge(graphdef, state)

    return load
