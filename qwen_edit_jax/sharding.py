"""`qwen_edit_jax.sharding`: the public face of `parallel/` (meshes, rules, placement), plus a sharded forward.

The implementation lives in `parallel/` (mesh, rules, distributed) and the loading layer
(`load_transformer(path, mesh=...)`); this module keeps `sharding.make_mesh` & co. where users
and scripts have them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from .parallel import (  # noqa: F401  (re-exported)
    BATCH_AXES,
    LOGICAL_RULES,
    MESH_AXES,
    batch_axes_for,
    batch_sharding,
    constrain,
    current_mesh,
    init_opt_state,
    is_sharded,
    like_params,
    logical_to_spec,
    make_mesh,
    param_shardings,
    param_spec,
    param_specs,
    replicated,
    resolve_mesh_shape,
    shard_model,
    sharded_jit,
)


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


__all__ = ["BATCH_AXES", "LOGICAL_RULES", "MESH_AXES", "batch_axes_for", "batch_sharding", "constrain", "current_mesh",
           "init_opt_state", "is_sharded", "like_params", "logical_to_spec", "make_mesh", "param_shardings", "param_spec",
           "param_specs", "replicated", "resolve_mesh_shape", "shard_model", "sharded_forward", "sharded_jit"]
