"""Host-offloaded stacked weights: a layer scan whose frozen weights live in host memory.

`offloaded_scan(fn, carry, xs, host_xs, consts)` runs `carry = fn(carry, xs[i], host_xs[i], consts)` for
every layer `i`. `xs` (the LoRA adapters) stay on the device; `host_xs` (the frozen base: its leaves placed
with `memory_kind=HOST` by the loader, `is_offloaded`; those on the device pass through) is copied to the
device one layer at a time, the copy of layer `i+1` issued in the iteration that computes layer `i` so that
XLA can overlap the transfer with the compute (double buffering). The backward is written out (`jax.custom_vjp`): a reverse scan that fetches each layer again
(next one in flight), recomputes its forward from the saved layer input and applies its VJP — the same
work as full remat, with only one or two layers of weights on the device at any time. Differentiating
through `jax.checkpoint` instead would keep every fetched layer as a residual.

Transfers per call: `L + 1` layers forward, `L + 1` more in the backward (the last prefetch of each
direction repeats a layer). The host stack gets no gradient (it is the frozen base).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

HOST = "pinned_host"  # memory kind of offloaded leaves (jax.sharding.Sharding.with_memory_kind)


def is_offloaded(path: str) -> bool:
    """Whether `offload="base"` keeps the frozen leaf at flat `path` in host memory: the blocks' stacked
    kernels and their scales (`[L, in, *out]`, 99.9 % of the blocks' bytes). Biases and norm scales stay on
    the device: the TPU compiler cannot slice one layer out of a host-side bf16 `[L, n]` / `[L, 3, n]`
    array whose layout packs the layer axis (measured with libtpu's AOT compiler)."""
    return path.startswith("transformer_blocks.") and path.endswith((".kernel", ".kernel_scale"))


LayerFn = Callable[[Any, Any, Any, Any], Any]


def fetch(host_xs: Any, i: jax.Array) -> Any:
    """Layer `i` of a host-resident stack, copied to device memory."""
    return jax.tree.map(lambda x: jax.device_put(jax.lax.dynamic_index_in_dim(x, i, keepdims=False),
                                                 jax.memory.Space.Device), host_xs)


def _length(host_xs: Any) -> int:
    leaves = jax.tree.leaves(host_xs)
    if not leaves:
        raise ValueError("offloaded_scan needs at least one host-resident stacked leaf")
    return leaves[0].shape[0]


def _forward(fn: LayerFn, carry: Any, xs: Any, host_xs: Any, consts: Any, save: bool) -> tuple[Any, Any]:
    n = _length(host_xs)

    def body(c, inp):
        i, x = inp
        h, w = c
        w_next = fetch(host_xs, jnp.minimum(i + 1, n - 1))  # in flight while layer i computes
        return (fn(h, x, w, consts), w_next), (h if save else None)

    (out, _), saved = jax.lax.scan(body, (carry, fetch(host_xs, 0)), (jnp.arange(n), xs))
    return out, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def offloaded_scan(fn: LayerFn, carry: Any, xs: Any, host_xs: Any, consts: Any) -> Any:
    """`carry` after `fn` over every layer; `xs` sliced per layer on the device, `host_xs` fetched per layer."""
    return _forward(fn, carry, xs, host_xs, consts, save=False)[0]


def _fwd(fn: LayerFn, carry: Any, xs: Any, host_xs: Any, consts: Any):
    out, saved = _forward(fn, carry, xs, host_xs, consts, save=True)
    return out, (saved, xs, host_xs, consts)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _bwd(fn: LayerFn, res: tuple, g: Any):
    saved, xs, host_xs, consts = res
    n = _length(host_xs)
    leaves, treedef = jax.tree.flatten(consts)
    diff = [i for i, leaf in enumerate(leaves) if _is_float(leaf)]  # masks (bool) get no cotangent

    def with_diff(values):
        full = list(leaves)
        for i, v in zip(diff, values):
            full[i] = v
        return jax.tree.unflatten(treedef, full)

    def body(c, inp):
        i, x, h = inp
        g_h, w, g_k = c
        w_next = fetch(host_xs, jnp.maximum(i - 1, 0))  # in flight while layer i is recomputed
        _, vjp = jax.vjp(lambda h_, x_, k_: fn(h_, x_, w, with_diff(k_)), h, x, [leaves[j] for j in diff])
        g_h, g_x, g_kl = vjp(g_h)
        return (g_h, w_next, [a + b for a, b in zip(g_k, g_kl)]), g_x

    zeros = [jnp.zeros_like(leaves[j]) for j in diff]
    (g_carry, _, g_k), g_xs = jax.lax.scan(body, (g, fetch(host_xs, n - 1), zeros), (jnp.arange(n), xs, saved),
                                           reverse=True)
    full = [np.zeros(np.shape(leaf), jax.dtypes.float0) for leaf in leaves]
    for i, v in zip(diff, g_k):
        full[i] = v
    return g_carry, g_xs, None, jax.tree.unflatten(treedef, full)


offloaded_scan.defvjp(_fwd, _bwd)

__all__ = ["HOST", "fetch", "is_offloaded", "offloaded_scan"]
