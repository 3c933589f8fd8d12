"""The jitted LoRA step: only LoRA params train, accumulation averages, a bf16 base, donation, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qwen_edit_jax as q
from qwen_edit_jax.config import LoraConfig, ModelOptions
from qwen_edit_jax.testing.batches import train_batch
from qwen_edit_jax.training.config import ObjectiveSection, OptimSection
from qwen_edit_jax.training.objective import flow_matching_loss, timestep_table
from qwen_edit_jax.training.step import make_optimizer, make_schedule, make_train_step, split_lora

TINY = q.preset("tiny")
SHAPES = ((1, 2, 3), (1, 3, 2))


def _model(**opts):
    lora = LoraConfig(rank=4, alpha=8)
    return q.init_transformer(TINY, ModelOptions(lora=lora, **opts), seed=1)


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def test_only_lora_params_train_and_buffers_are_donated():
    graphdef, params, base = split_lora(_model())
    tx, _ = make_optimizer(OptimSection(learning_rate=1e-2, warmup_steps=0), 10)
    opt_state = tx.init(params)
    n_lora = sum(x.size for x in jax.tree.leaves(params))
    n_base = sum(x.size for x in jax.tree.leaves(base))
    assert n_lora < n_base / 5
    # Adam moments exist for the LoRA params only (+ scalar counters)
    assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim) == 2 * n_lora
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    base0, params0 = _host(base), _host(params)
    step = make_train_step(graphdef, tx, ObjectiveSection())
    old_leaf = jax.tree.leaves(params)[0]
    key = jax.random.key(0)
    for i in range(3):
        params, opt_state, m = step(params, opt_state, base, SHAPES, train_batch(i), key, i)
        assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert old_leaf.is_deleted()  # LoRA params were donated to the step
    jax.tree.map(np.testing.assert_array_equal, _host(base), base0)  # frozen base untouched
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_host(params)), jax.tree.leaves(params0))]
    assert all(changed)  # every adapter matrix (A and B) moved


def test_grad_accumulation_averages_micro_batches():
    graphdef, params, base = split_lora(_model())
    tx = optax.sgd(1.0)  # update = −mean gradient, so params reveal the gradient exactly
    objective = ObjectiveSection(timestep_sampling="uniform")
    batch = train_batch(3, accum=3, batch=2)
    key = jax.random.key(7)
    p0 = _host(params)
    new, _, m = make_train_step(graphdef, tx, objective, donate=False)(
        params, tx.init(params), base, SHAPES, batch, key, 5)

    table = timestep_table(objective, 6)

    def loss(p, micro, k):
        return flow_matching_loss(nnx.merge(graphdef, p, base), micro, k, table, SHAPES)[0]

    step_key = jax.random.fold_in(key, 5)
    grads, losses = [], []
    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one program for the three micro-batches
    for i in range(3):
        micro = jax.tree.map(lambda x: jnp.asarray(x[i]), batch)
        l, g = value_and_grad(params, micro, jax.random.fold_in(step_key, i))
        grads.append(g)
        losses.append(float(l))
    mean_g = jax.tree.map(lambda *g: sum(g) / 3, *grads)
    expect = jax.tree.map(lambda p, g: p - g, p0, _host(mean_g))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), _host(new), expect)
    assert float(m["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.slow
def test_bf16_base_keeps_fp32_lora_params():
    """A bf16 base (with full remat) keeps fp32 LoRA params and computes the fp32 model's loss on the rounded
    weights.

    (That every remat policy gives the values and gradients of no remat is tests/test_transformer.py's
    test_remat_policies_same_values_and_grads, on the model the step differentiates. bf16 *activations* are
    exercised on GPU/TPU only: XLA:CPU's DotThunk cannot run the backward pass's bf16 x bf16 -> f32 batched
    dots.)
    """
    # SGD with rate 1, no donation: the program test_step_accepts_img_shapes_per_sample_or_once compiles
    sgd = optax.sgd(1.0)
    graphdef32, params32, base32 = split_lora(_model(remat="none"))
    step32 = make_train_step(graphdef32, sgd, donate=False)
    _, _, m_none = step32(params32, sgd.init(params32), base32, SHAPES, train_batch(), jax.random.key(0), 0)
    tx, _ = make_optimizer(OptimSection(learning_rate=1e-3), 10)  # the loss is that of the params before the update
    graphdef, params, base = split_lora(_model(param_dtype="bfloat16", dtype="float32", remat="full"))
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
    out, _, m = make_train_step(graphdef, tx)(params, tx.init(params), base, SHAPES, train_batch(), jax.random.key(0), 0)
    assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.float32)}
    # Reference: the fp32 model holding the same bf16-rounded weights as fp32 values. A bf16 base with fp32
    # activations must compute exactly that (weights upcast, fp32 math): measured rel 4.8e-7; 1e-5 leaves
    # room for summation order, far below the 1.1e-4 that the rounding of the weights itself moves the loss.
    # (The step's loss is that of the params before the update, so the fp32 step above, with the rounded
    # base, gives it: the same program, the remat policy gives the same loss as asserted above.)
    rounded = jax.tree.map(lambda x: x.astype(jnp.float32), base)
    _, _, m32 = step32(params32, sgd.init(params32), rounded, SHAPES, train_batch(), jax.random.key(0), 0)
    assert float(m["loss"]) == pytest.approx(float(m32["loss"]), rel=1e-5)
    # and against the unrounded fp32 base: weight rounding (2^-9 relative per weight) moved it by 1.1e-4
    assert float(m["loss"]) == pytest.approx(float(m_none["loss"]), rel=2**-9)


def test_step_accepts_img_shapes_per_sample_or_once():
    """The model's two `img_shapes` conventions: one list for the batch, or one list per sample (all equal)."""
    graphdef, params, base = split_lora(_model())
    tx = optax.sgd(1.0)  # the step of test_bf16_base_keeps_fp32_lora_params (remat none): the same compiled program
    step = make_train_step(graphdef, tx, donate=False)
    opt = tx.init(params)
    flat, _, m1 = step(params, opt, base, SHAPES, train_batch(), jax.random.key(0), 0)
    nested, _, m2 = step(params, opt, base, [list(map(list, SHAPES))] * 2, train_batch(), jax.random.key(0), 0)
    assert float(m1["loss"]) == float(m2["loss"])
    jax.tree.map(np.testing.assert_array_equal, _host(flat), _host(nested))
    assert len(step._fns) == 1  # one layout, one compiled step
    with pytest.raises(ValueError, match="share one image layout"):
        step(params, opt, base, [list(SHAPES), [(1, 3, 2), (1, 2, 3)]], train_batch(), jax.random.key(0), 0)
    with pytest.raises(ValueError, match=r"describe 18 tokens but hidden_states has 12"):
        step(params, opt, base, [(1, 2, 3), (1, 3, 2), (1, 2, 3)], train_batch(), jax.random.key(0), 0)


def test_schedules():
    cfg = OptimSection(learning_rate=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    s = make_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(5e-4) and float(s(10)) == pytest.approx(1e-3)
    assert float(s(110)) == pytest.approx(1e-4, rel=1e-3) and float(s(60)) == pytest.approx(5.5e-4, rel=1e-3)
    lin = make_schedule(OptimSection(learning_rate=1e-3, schedule="linear", min_lr_ratio=0.0), 100)
    assert float(lin(50)) == pytest.approx(5e-4)
    assert float(make_schedule(OptimSection(), 100)(77)) == pytest.approx(1e-4)  # default: constant 1e-4


def test_gradient_clipping_bounds_the_update():
    graphdef, params, base = split_lora(_model())
    p0 = _host(params)
    # plain SGD after clipping to norm 1e-3: the whole update has norm ≤ 1e-3
    tx = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    new, _, m = make_train_step(graphdef, tx)(params, tx.init(params), base, SHAPES, train_batch(), jax.random.key(0), 0)
    delta = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(_host(new)), jax.tree.leaves(p0))))
    assert float(m["grad_norm"]) > 1e-2 and delta == pytest.approx(1e-3, rel=1e-3)


# The step on a mesh equals the single-device step: tests/test_sharding.py::test_sharded_lora_step_equals_single_device
# (the real step, Adam state and adapters split, on four mesh shapes of 8 simulated devices).
