"""EMA of the adapter weights, updated inside the jitted step as part of the optimiser state.

`with_ema(tx, decay, eval_fn)` wraps an Optax transformation: its state is `EmaState(opt, ema, count)`,
and every update also moves `ema` (fp32) towards the new (evaluation) parameters:

    d_t = min(decay, (1 + t) / (10 + t)), d_0 = 0        (t = updates before this one)
    ema ← d_t · ema + (1 − d_t) · params

the decay warm-up of diffusers' `EMAModel` (the default `use_ema_warmup=False`, `update_after_step=0`), as
SimpleTuner's `--ema_decay` uses it: the first update copies the parameters, and short runs are not
dominated by the initial adapters. The checkpoint saves `ema` and `count` as their own Orbax item
(`training/checkpoint.py`); the loop exports it as a second LoRA file and validates with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

F32 = jnp.float32


class EmaState(NamedTuple):
    """The wrapped optimiser's state, the EMA of the parameters (fp32) and the number of updates so far."""

    opt: Any
    ema: Any
    count: jax.Array


def ema_decay_at(decay: float, count: jax.Array) -> jax.Array:
    """The decay of update number `count` (0-based): 0, then min(decay, (1 + t) / (10 + t))."""
    t = jnp.asarray(count, F32)
    return jnp.where(count == 0, 0.0, jnp.minimum(decay, (1.0 + t) / (10.0 + t))).astype(F32)


def with_ema(tx: optax.GradientTransformation, decay: float,
             eval_fn: Callable[[Any, Any], Any] = lambda opt_state, params: params
             ) -> optax.GradientTransformationExtraArgs:
    """`tx` whose state also carries the EMA of `eval_fn(inner state, updated params)` (see the module doc)."""
    tx = optax.with_extra_args_support(tx)

    def init(params):
        return EmaState(tx.init(params), jax.tree.map(lambda p: jnp.array(p, F32), params),
                        jnp.zeros((), jnp.int32))

    def update(grads, state, params=None, **extra):
        if params is None:
            raise ValueError("with_ema needs the parameters in update()")
        updates, opt = tx.update(grads, state.opt, params, **extra)
        new = eval_fn(opt, optax.apply_updates(params, updates))
        d = ema_decay_at(decay, state.count)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(F32), state.ema, new)
        return updates, EmaState(opt, ema, optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


__all__ = ["EmaState", "ema_decay_at", "with_ema"]
