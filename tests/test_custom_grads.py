"""The written-out backward passes (`ModelOptions.custom_grads`: `lora_delta`'s VJP, tanh-GELU's derivative)
equal autodiff's, and "auto" picks them per platform as measured (benchmarks/autodiff_variants.py)."""

from __future__ import annotations

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other local jax processes may hold the libtpu lock

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import qwen_edit_jax as q  # noqa: E402
from qwen_edit_jax import parallel  # noqa: E402
from qwen_edit_jax.config import LoraConfig, ModelOptions  # noqa: E402
from qwen_edit_jax.models.dit import layers  # noqa: E402
from tests.compare import assert_close  # noqa: E402

CUSTOM_GRADS_BY_PLATFORM, custom_grads, gelu = layers.CUSTOM_GRADS_BY_PLATFORM, layers.custom_grads, layers.gelu
lora_delta, lora_product = layers.lora_delta, layers.lora_product


def test_lora_delta_vjp_equals_autodiff():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 96, 64)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((64, 8)) / 8, jnp.float32)
    b = jnp.asarray(rng.standard_normal((8, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 96, 48)), jnp.float32)

    def loss(fn):
        return lambda x, a, b: jnp.sum(jnp.sin(fn(x, a, b)) * w)

    v0, g0 = jax.value_and_grad(loss(lora_product), argnums=(0, 1, 2))(x, a, b)
    v1, g1 = jax.value_and_grad(loss(lora_delta), argnums=(0, 1, 2))(x, a, b)
    assert float(v0) == float(v1)  # the same forward
    # measured: x and A equal, B 3.1e-7 of its largest entry (fp32 summation order)
    for name, d0, d1 in zip("xAB", g0, g1):
        assert_close(d1, d0, 3e-6, f"d{name}")


def test_gelu_derivative_equals_autodiff():
    x = jnp.linspace(-6.0, 6.0, 4001, dtype=jnp.float32)
    y0, g0 = jax.vmap(jax.value_and_grad(lambda v: gelu(v, False)))(x)
    y1, g1 = jax.vmap(jax.value_and_grad(lambda v: gelu(v, True)))(x)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    assert float(jnp.max(jnp.abs(g1 - g0))) <= 7e-6  # measured: 7.4e-7 (fp32 derivative vs autodiff's)


def test_model_gradients_equal_with_and_without_custom_grads():
    cfg = q.preset("tiny")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 32, cfg.in_channels)), jnp.float32)
    e = jnp.asarray(rng.standard_normal((1, 7, cfg.joint_attention_dim)), jnp.float32)
    t = jnp.full((1,), 0.4, jnp.float32)
    out = {}
    for grads in ((), ("gelu", "lora")):
        model = q.init_transformer(cfg, ModelOptions(lora=LoraConfig(rank=4), custom_grads=grads), seed=0)
        graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
        # B starts at zero; random B so that every LoRA gradient (A's included) is non-zero
        lora = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(1), v.shape), lora)

        def loss(lora, graphdef=graphdef, base=base):
            y = nnx.merge(graphdef, lora, base)(hidden_states=x, encoder_hidden_states=e, timestep=t,
                                                img_shapes=[[(1, 4, 8)]])
            return jnp.mean(y.astype(jnp.float32) ** 2)

        out[grads] = jax.jit(jax.value_and_grad(loss))(lora)
    (v0, g0), (v1, g1) = out[()], out[("gelu", "lora")]
    assert float(v1) == pytest.approx(float(v0), rel=1e-6)
    # measured: ≤ 4.5e-7 of each leaf's largest entry
    for (path, d0), d1 in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        assert_close(d1, d0, 4.5e-6, jax.tree_util.keystr(path))


def test_platform_choice():
    assert custom_grads("auto", "cpu") == {"lora", "gelu"}
    assert custom_grads("auto", "tpu") == {"gelu"}  # the LoRA VJP added copies on v6e
    for gpu in ("gpu", "cuda", "rocm"):  # unmeasured: plain autodiff
        assert custom_grads("auto", gpu) == frozenset()
    assert custom_grads(("lora",), "cpu") == {"lora"} and custom_grads((), "cpu") == frozenset()
    assert custom_grads() == CUSTOM_GRADS_BY_PLATFORM[jax.default_backend()]
    assert ModelOptions(custom_grads=["lora", "gelu", "lora"]).custom_grads == ("gelu", "lora")
    with pytest.raises(ValueError, match="custom_grads"):
        ModelOptions(custom_grads=("silu",))


def test_auto_follows_the_mesh_platform_of_an_aot_target():
    """The planner compiles for a TPU topology on this CPU host: "auto" must take the TPU's set, not the host's."""
    pytest.importorskip("libtpu", reason="TPU topologies need the tpu-plan extra (libtpu)")
    from qwen_edit_jax.training.plan import topology_devices

    mesh = parallel.make_mesh(1, 1, 1, devices=topology_devices("v5e:1x1"))
    seen, arg = [], jax.ShapeDtypeStruct((2,), jnp.float32)
    with jax.set_mesh(mesh):  # as the planner's AOT lowering traces the step
        jax.make_jaxpr(lambda v: seen.append(custom_grads()) or v)(arg)
    assert seen == [{"gelu"}] and custom_grads() == CUSTOM_GRADS_BY_PLATFORM["cpu"]  # the host's, outside
