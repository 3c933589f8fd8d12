"""The optimiser and the jitted LoRA training step.

Only the LoRA parameters (`nnx.LoRAParam`, fp32) are differentiated and carry optimiser state;
the frozen base weights are an input of the step (any dtype, never donated, never copied). The
step is one `jax.jit` per image layout (XLA retraces per text bucket) with the LoRA parameters
and optimiser state donated; gradient accumulation is a `lax.scan` over micro-batches inside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ..models.dit import normalize_img_shapes
from ..parallel import batch_sharding, distributed, replicated, sharded_jit
from .config import ObjectiveSection, OptimSection
from .ema import EmaState, with_ema
from .objective import flow_matching_loss, timestep_table

Params = Any  # nested dict of arrays (nnx.to_pure_dict of the LoRA state)


def make_schedule(cfg: OptimSection, max_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 (if `warmup_steps`), then constant, cosine or linear decay to
    `min_lr_ratio · learning_rate` at `max_steps`."""
    lr = cfg.learning_rate
    decay = max(max_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, lr * cfg.min_lr_ratio, decay)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}: unknown schedule")
    if cfg.warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, cfg.warmup_steps), main], [cfg.warmup_steps])


def _is_lora_b(path: tuple) -> bool:
    last = path[-1] if path else None
    return getattr(last, "key", getattr(last, "name", None)) == "lora_B"


def lora_plus(ratio: float) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024; musubi-tuner's `loraplus_lr_ratio`): the updates of the `lora_B` leaves × `ratio`.

    Placed after the learning rate of an optimiser whose rate multiplies its whole update (AdamW with its
    decoupled decay, Adafactor, schedule-free AdamW's inner step), this equals giving B its own parameter
    group at `learning_rate × ratio`. Other leaves (`lora_A`, DoRA's `lora_magnitude`, LoKr's factors) keep
    the base rate."""
    return optax.masked(optax.scale(ratio),
                        lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: _is_lora_b(p), tree))


def make_optimizer(cfg: OptimSection, max_steps: int, *, ema_decay: float | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`cfg.optimizer` with the schedule, after global-norm clipping when set (and LoRA+, EMA when set).

    * `adamw`: `optax.adamw` (decoupled weight decay × lr).
    * `adafactor`: `optax.adafactor` as Hugging Face's `Adafactor(scale_parameter=False, relative_step=False)`:
      `learning_rate` is the step size, its own update clipping (RMS 1) and decay-rate schedule (0.8); b1, b2
      and eps are not used; weight decay × lr as AdamW's.
    * `prodigy`: `optax.contrib.prodigy`; `learning_rate` (and the schedule) multiplies its estimated step size.
    * `schedule_free_adamw`: `optax.contrib.schedule_free` over AdamW without momentum, as
      `optax.contrib.schedule_free_adamw` composes it; b1 is its interpolation. Evaluate (export, validate,
      EMA) with `eval_params(opt_state, params)`.

    `ema_decay`: the state also carries the EMA of the (evaluation) parameters (`training/ema.py`).
    """
    schedule = make_schedule(cfg, max_steps)
    # identity() when clipping is off keeps the state structure, so a run can resume with clipping toggled
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm else optax.identity()
    plus = [lora_plus(cfg.lora_plus_ratio)] if cfg.lora_plus_ratio else []
    if cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adafactor":
        wd = cfg.weight_decay
        opt = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                              weight_decay_rate=(lambda count: wd * schedule(count)) if wd else None)
    elif cfg.optimizer == "prodigy":
        if plus:
            raise ValueError("optim.lora_plus_ratio is not supported with optim.optimizer=prodigy")
        opt = optax.contrib.prodigy(schedule, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "schedule_free_adamw":
        inner = optax.chain(optax.scale_by_rms(decay=cfg.b2, eps=cfg.eps, eps_in_sqrt=False, bias_correction=True),
                            optax.add_decayed_weights(cfg.weight_decay), optax.scale_by_learning_rate(schedule), *plus)
        opt, plus = optax.contrib.schedule_free(inner, learning_rate=schedule, b1=cfg.b1), []
    else:
        raise ValueError(f"optim.optimizer={cfg.optimizer!r}: unknown optimizer")
    tx = optax.chain(clip, opt, *plus)
    if ema_decay is not None:
        tx = with_ema(tx, ema_decay, eval_params)
    return tx, schedule


def _schedule_free_state(state: Any) -> Any:
    if isinstance(state, optax.contrib.ScheduleFreeState):
        return state
    if isinstance(state, tuple):  # chains and wrappers (NamedTuples are tuples)
        for s in state:
            found = _schedule_free_state(s)
            if found is not None:
                return found
    return None


def eval_params(opt_state: Any, params: Params) -> Params:
    """The parameters to evaluate, export and average: `optax.contrib.schedule_free_eval_params` for a
    schedule-free optimiser's state, else `params` themselves."""
    sf = _schedule_free_state(opt_state.opt if isinstance(opt_state, EmaState) else opt_state)
    return params if sf is None else optax.contrib.schedule_free_eval_params(sf, params)


def ema_params(opt_state: Any) -> Params | None:
    """The EMA of the adapters carried by `opt_state` (`make_optimizer(ema_decay=…)`), or None."""
    return opt_state.ema if isinstance(opt_state, EmaState) else None


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, Params, Params]:
    """(graphdef, LoRA params, frozen base) as pure dicts of arrays; `nnx.merge(graphdef, lora, base)`."""
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    return graphdef, nnx.to_pure_dict(lora), nnx.to_pure_dict(base)


def _mean_tree(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda g: g / n, tree)


class TrainStep:
    """`step(params, opt_state, base, img_shapes, arrays, rng, step) -> (params, opt_state, metrics)`.

    `img_shapes`: (1, h, w) of the target, then of each reference — one list, or one per sample
    (all equal), as the model and `sampling.sample` accept. `arrays`: `target` [A, B, N, C],
    `references` [A, B, M, C], `prompt_embeds` [A, B, L, J], `prompt_mask` [A, B, L], optionally
    `loss_mask` [A, B, N, 4] (A = grad-accumulation micro-batches, B = batch; a run's batches all
    carry `loss_mask` or none do). `rng` is a typed key;
    the step's randomness is `fold_in(rng, step)` so a resumed run draws the same noise.

    With `mesh`, every call is jitted with explicit shardings: parameters, base and optimiser state
    keep the shardings they arrive with (placed by `qwen_edit_jax.parallel`), the batch is split
    along B by `parallel.batch_sharding(mesh)`, metrics are replicated.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        tx: optax.GradientTransformation,
        objective: ObjectiveSection,
        *,
        mesh: Any = None,
        global_batch: int | None = None,
        donate: bool = True,
    ):
        self.graphdef, self.tx, self.objective, self.mesh = graphdef, tx, objective, mesh
        self.global_batch, self.donate = global_batch, donate
        self._fns: dict[tuple, Callable] = {}

    def _step_fn(self, img_shapes: tuple) -> Callable:
        graphdef, tx = self.graphdef, self.tx
        n_target = int(np.prod(img_shapes[0]))
        table = timestep_table(self.objective, n_target)
        min_weight = self.objective.mask_min_weight

        def micro_loss(params, base, micro, key):
            model = nnx.merge(graphdef, params, base)
            return flow_matching_loss(model, micro, key, table, img_shapes, min_weight)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def step(params, opt_state, base, arrays, rng, step):
            key = jax.random.fold_in(rng, step)
            accum = arrays["target"].shape[0]
            if accum == 1:
                micro = jax.tree.map(lambda x: x[0], arrays)
                (loss, aux), grads = grad_fn(params, base, micro, jax.random.fold_in(key, 0))
            else:
                def body(carry, inp):
                    i, micro = inp
                    (loss_i, a), g = grad_fn(params, base, micro, jax.random.fold_in(key, i))
                    gsum, lsum, asum = carry
                    return (jax.tree.map(jnp.add, gsum, g), lsum + loss_i, jax.tree.map(jnp.add, asum, a)), None

                zeros = jax.tree.map(jnp.zeros_like, params)
                aux0 = {"mse": jnp.zeros((), jnp.float32), "sigma": jnp.zeros((), jnp.float32)}
                (gsum, lsum, asum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), aux0),
                                                     (jnp.arange(accum), arrays))
                grads, loss, aux = _mean_tree(gsum, accum), lsum / accum, _mean_tree(asum, accum)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            param_norm = optax.tree.norm(params)  # non-finite ⇒ the update broke the weights
            return params, opt_state, {"loss": loss, "grad_norm": grad_norm, "param_norm": param_norm, **aux}

        donate = (0, 1) if self.donate else ()
        if self.mesh is None:
            return jax.jit(step, donate_argnums=donate)
        return _MeshJit(step, self.mesh, donate, self.global_batch)

    def _fn_for(self, img_shapes: Any, arrays: dict[str, Any]) -> Callable:
        """The jitted step of this batch's image layout (made on first use)."""
        layout = _layout(img_shapes, arrays)
        if layout not in self._fns:
            self._fns[layout] = self._step_fn(layout)
        return self._fns[layout]

    def __call__(self, params, opt_state, base, img_shapes, arrays, rng, step):
        fn = self._fn_for(img_shapes, arrays)
        return fn(params, opt_state, base, arrays, rng, jnp.asarray(step, jnp.int32))

    def lower(self, params, opt_state, base, img_shapes, arrays, rng, step):
        """Ahead-of-time lowering (memory plans): arguments may be `jax.ShapeDtypeStruct`s; needs `mesh`."""
        return self._fn_for(img_shapes, arrays).lower(params, opt_state, base, arrays, rng, step)


def _layout(img_shapes: Any, arrays: dict[str, Any]) -> tuple[tuple[int, int, int], ...]:
    """The batch's one image layout from `img_shapes` in either convention the model accepts: one list
    of (frames, h, w) (target first, then references) or one such list per sample (all equal)."""
    n_tokens = arrays["target"].shape[2] + (arrays["references"].shape[2] if "references" in arrays else 0)
    return normalize_img_shapes(img_shapes, None, n_tokens)


class _MeshJit:
    """`parallel.sharded_jit` with in/out shardings taken from the first call's (already placed) arguments.

    The batch arrives as this host's rows (`parallel.distributed.local_batch_rows`) and is assembled into
    global arrays [A, B, ...] split on B by `parallel.batch_sharding(mesh, B)`.
    """

    def __init__(self, fn: Callable, mesh: Any, donate: tuple, global_batch: int | None):
        self.fn, self.mesh, self.donate, self.global_batch = fn, mesh, donate, global_batch
        self._jitted: dict[int, Any] = {}

    def _accum_sharding(self, batch: int) -> NamedSharding:
        """[A, B, ...] micro-batches: B split like a batch of `batch`, A whole."""
        return NamedSharding(self.mesh, PartitionSpec(None, *batch_sharding(self.mesh, batch).spec))

    def _jit(self, params, opt_state, base, accum: NamedSharding) -> Any:
        """The step jitted with the arguments' own shardings (non-arrays replicated), the batch on `accum`."""
        rep = replicated(self.mesh)

        def sh(tree):
            return jax.tree.map(lambda x: x.sharding if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else rep,
                                tree)

        p_sh, o_sh, b_sh = sh(params), sh(opt_state), sh(base)
        return sharded_jit(self.fn, self.mesh, donate_argnums=self.donate,
                           in_shardings=(p_sh, o_sh, b_sh, accum, rep, rep), out_shardings=(p_sh, o_sh, rep))

    def __call__(self, params, opt_state, base, arrays, rng, step):
        batch = self.global_batch or arrays["target"].shape[1] * jax.process_count()
        accum = self._accum_sharding(batch)
        arrays = distributed.global_batch(arrays, accum, batch, axis=1)
        if batch not in self._jitted:
            self._jitted[batch] = self._jit(params, opt_state, base, accum)
        return self._jitted[batch](params, opt_state, base, arrays, rng, step)

    def lower(self, params, opt_state, base, arrays, rng, step):
        """AOT (benchmarks/memory_plan.py): `jax.ShapeDtypeStruct` arguments, params/opt state/base with shardings."""
        accum = self._accum_sharding(arrays["target"].shape[1])
        arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=accum) for k, v in arrays.items()}
        return self._jit(params, opt_state, base, accum).lower(params, opt_state, base, arrays, rng, step)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: ObjectiveSection | None = None,
    *,
    mesh: Any = None,
    global_batch: int | None = None,
    donate: bool = True,
) -> TrainStep:
    """The reusable LoRA training step (see `TrainStep`); used by the loop and the benchmarks.

    `mesh` (from `qwen_edit_jax.parallel.make_mesh`): jit with explicit shardings; the params,
    base and optimiser state must already be placed on it (`load_transformer(mesh=)`, `parallel.init_opt_state`),
    and `global_batch` is the micro-batch size over all hosts (default: local rows × hosts).
    """
    return TrainStep(graphdef, tx, objective or ObjectiveSection(), mesh=mesh, global_batch=global_batch,
                     donate=donate)
