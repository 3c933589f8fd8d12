"""Parallelism with JAX only: meshes, the logical sharding rules, activation constraints, multi-host start-up.

No module here imports the models or the weight readers; models name their axes logically and this
package maps the names onto a mesh (`LOGICAL_RULES`, the only mesh table).
"""

from . import distributed
from .mesh import BATCH_AXES, MESH_AXES, batch_axes_for, current_mesh, make_mesh, resolve_mesh_shape
from .rules import (
    LOGICAL_RULES,
    batch_sharding,
    constrain,
    constrain_tokens,
    init_opt_state,
    is_sharded,
    like_params,
    logical_to_spec,
    param_shardings,
    param_spec,
    replicated,
    shard_model,
    sharded_jit,
)

__all__ = [
    "BATCH_AXES", "LOGICAL_RULES", "MESH_AXES", "batch_axes_for", "batch_sharding", "constrain", "constrain_tokens", "current_mesh",
    "distributed", "init_opt_state", "is_sharded", "like_params", "logical_to_spec", "make_mesh", "param_shardings",
    "param_spec", "replicated", "resolve_mesh_shape", "shard_model", "sharded_jit",
]
