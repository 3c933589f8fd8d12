"""Device meshes: axes ('data', 'fsdp', 'tensor'), shape resolution, the batch axes, the current mesh."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None  # one mesh axis, several (outermost first), or none


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


def current_mesh():
    """The mesh set by `jax.set_mesh` (an AbstractMesh while tracing) or None."""
    m = jax.sharding.get_abstract_mesh()
    return None if m is None or m.empty else m
