"""The logical→mesh sharding table and the placement of weights, LoRA, optimizer state, batches and activations.

Parameters carry logical axis names in the model code (`out_sharding` metadata: 'layers', 'embed',
'heads', 'qkv', 'mlp', 'mod', None). One table, `LOGICAL_RULES`, maps them to the three mesh axes
`('data', 'fsdp', 'tensor')`:

- FSDP (ZeRO-3): every weight is split on its model-width (`embed`) axis over `fsdp`; XLA
  all-gathers one layer's weights inside the scan just before use.
- Tensor parallelism: attention heads, the MLP hidden width and the adaLN modulation outputs are
  split over `tensor` (Megatron pattern: column-parallel in, row-parallel out).
- Data parallelism: a batch is split over `data × fsdp` (FSDP is data parallel for activations).
- Sequence parallelism: when a batch is smaller than data × fsdp, the model constrains its activations
  by logical names (`constrain_tokens`: ("batch", "seq", None)); the token axis takes the batch axes
  the batch dimension could not use, so a batch of 1 on 8 chips splits its tokens 8 ways instead of
  computing the same sample 8 times.
- `qkv` (the q|k|v group of the fused projections) and `layers` stay whole.

FSDP covers every sizeable array (`param_spec`): when the table leaves `fsdp` unused — LoRA B
`[r, heads]`, a fused bias `[3, heads]` on a mesh without tensor parallelism — the largest free
dimension it divides is split on `fsdp` (never `layers`). LoRA adapters follow their base weight's
names (A on the input width, B on the output width), so they and their Adam moments are sharded
too: at rank 32 on all block linears they are 212 M fp32 values, 3.4 GB with gradients and Adam
state, which replicated would eat a quarter of a v5e chip.

A dimension that the mapped mesh axes do not divide is left whole (replicated) rather than padded,
so tiny test configs run on any mesh.

Everything that traces the model under a mesh must do so in `jax.set_mesh(mesh)` (`sharded_jit`
does it), so that activation constraints and the splash kernel's `shard_map` see the mesh;
without a mesh they are no-ops.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .mesh import BATCH_AXES, MeshAxes, _entry, batch_axes_for, current_mesh

# logical axis name → mesh axis (or axes, outermost first, or None = never split)
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),  # activations: samples over data × fsdp
    ("embed", "fsdp"),  # weights: model width (3072) over fsdp
    ("heads", "tensor"),  # attention heads (q/k/v outputs, to_out inputs)
    ("mlp", "tensor"),  # MLP hidden width (12288)
    ("mod", "tensor"),  # adaLN modulation outputs (6·3072)
    ("qkv", None),  # the q|k|v group axis of fused projections
    ("layers", None),  # stacked blocks: the scan walks this axis
    ("seq", BATCH_AXES),  # activation tokens: over the batch axes the batch dimension left unused
)


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


def init_opt_state(tx: Any, params: Any, mesh: Mesh | None = None) -> Any:
    """`tx.init(params)` computed on-device; on a mesh every moment is placed like its (sharded) parameter
    (scalars replicated)."""
    if mesh is None:
        return jax.jit(tx.init)(params)
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    out_sh = like_params(jax.eval_shape(tx.init, params), params, p_sh, mesh)
    with jax.set_mesh(mesh):
        return jax.jit(tx.init, out_shardings=out_sh)(params)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move every variable of `model` onto `mesh` per `LOGICAL_RULES`, in place; returns `model`."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def is_sharded(x: jax.Array) -> bool:
    """True if no device holds all of `x` (it really is split)."""
    return any(s.data.shape != x.shape for s in x.addressable_shards)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh; a no-op without one."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def constrain_tokens(x: jax.Array) -> jax.Array:
    """Constrain `[B, S, …]` activations to ("batch", "seq", …) when the batch leaves batch axes unused.

    Then the token axis takes them (sequence parallelism: a batch of 1 on 8 chips computes an eighth
    of the tokens per chip instead of the whole sample 8 times). When the batch alone covers the
    batch axes, GSPMD already shards activations like the batch and no constraint is added.

    Not on meshes whose three axes all exceed 1: there, on XLA:CPU, any activation constraint in the
    block (tokens, MLP hidden or heads) gave wrong outputs (rel. err ≈ 0.3) with both the Shardy and
    the GSPMD partitioner, while every 2-axis mesh was exact (tests/test_sharding.py). Until that is
    understood (cf. openxla/xla#40034) such meshes keep the unconstrained, correct program.
    """
    mesh = current_mesh()
    if mesh is None or x.ndim < 2:
        return x
    sizes = dict(mesh.shape)
    if all(sizes.get(a, 1) > 1 for a in ("data", "fsdp", "tensor")):
        return x
    used = batch_axes_for(mesh, x.shape[0])
    if len(used) == len([a for a in BATCH_AXES if sizes.get(a, 1) > 1]):
        return x
    return constrain(x, ("batch", "seq") + (None,) * (x.ndim - 2))


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
