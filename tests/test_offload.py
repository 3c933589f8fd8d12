"""Host-offloaded frozen base (`ModelOptions(offload="base")`): the blocks' kernels live in `pinned_host`
memory and stream to the device one layer at a time; every result equals the model kept on the device.

The CPU backend has `device` and `pinned_host` memories, so the real transfers run here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwen_edit_jax as q
from qwen_edit_jax.config import LoraConfig, ModelOptions
from qwen_edit_jax.loading.dit import model_from_params, model_params
from qwen_edit_jax.models.offload import HOST, is_offloaded, offloaded_scan
from qwen_edit_jax.testing.batches import forward_inputs, train_batch
from qwen_edit_jax.training.config import ObjectiveSection, OptimSection
from qwen_edit_jax.training.step import make_optimizer, make_train_step, split_lora

TINY = q.preset("tiny")
SHAPES = ((1, 2, 3), (1, 3, 2))


def _flat(state):
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _params(seed=1):
    lazy = model_params(q.init_transformer(TINY, ModelOptions(), seed=seed))
    return {p: lazy.read(p) for p in lazy.paths()}


def _pair(quantize=None, lora=True):
    """The same weights loaded twice: on the device (full remat) and with the base offloaded, the LoRA B
    made non-zero (equal in both) so that every adapter carries gradient."""
    params = _params()
    lo = LoraConfig(rank=4, alpha=8) if lora else None
    models = [model_from_params(TINY, ModelOptions(lora=lo, quantize=quantize, remat="full", offload=off), params)
              for off in ("none", "base")]
    if lora:
        state = nnx.state(models[0], nnx.LoRAParam)
        state = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape), state)
        for m in models:  # own buffers each: the training step donates them
            nnx.update(m, jax.tree.map(jnp.copy, state))
    return models


def test_placement_kernels_on_host_the_rest_on_device():
    off = model_from_params(TINY, ModelOptions(lora=LoraConfig(rank=4), quantize="int4", offload="base"), _params())
    kinds = {k: v.get_value().sharding.memory_kind for k, v in _flat(nnx.state(off)).items()}
    host = {k for k, m in kinds.items() if m == HOST}
    assert host == {k for k in kinds if is_offloaded(k)}
    assert "transformer_blocks.attn.to_qkv.kernel" in host and "transformer_blocks.attn.to_qkv.kernel_scale" in host
    # biases, norms, LoRA adapters and the non-block linears stay on the device
    for k in ("transformer_blocks.attn.to_qkv.bias", "transformer_blocks.attn.to_qkv.lora_A", "img_in.kernel"):
        assert kinds[k] == "device", k


def test_forward_and_lora_gradients_equal_the_device_model():
    """On an int4 base (the 16 GB setting); a float base takes the same path with other host dtypes."""
    on_device, offloaded = _pair("int4")
    x = forward_inputs(SHAPES, padding=1)
    np.testing.assert_array_equal(np.asarray(offloaded(**x)), np.asarray(on_device(**x)))

    def grads(model):
        graphdef, lora, base = split_lora(model)
        loss = lambda lo: jnp.mean(nnx.merge(graphdef, lo, base)(**x) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(lora)

    g0, g1 = grads(on_device), grads(offloaded)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.abs(np.asarray(a)).max() > 0
        # the written-out backward sums the same products as autodiff of the remat scan (measured ≤ 2e-7 rel.)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * np.abs(np.asarray(a)).max())


def test_gradients_of_the_layer_inputs_and_shared_context():
    """`offloaded_scan`'s cotangents for the carry and the per-call constants equal autodiff of the plain scan."""
    rng = np.random.default_rng(0)
    L, d = 3, 8
    w_dev = jnp.asarray(rng.standard_normal((L, d, d)) / 3, jnp.float32)
    w = jax.device_put(w_dev, jax.memory.Space.Host)
    assert w.sharding.memory_kind == HOST
    a = jnp.asarray(rng.standard_normal((L, d)), jnp.float32)  # per-layer trainable
    consts = (jnp.asarray(rng.standard_normal(d), jnp.float32), jnp.asarray(rng.standard_normal(d) > 0))
    h0 = jnp.asarray(rng.standard_normal((2, d)), jnp.float32)

    def layer(h, a_i, w_i, k):
        bias, mask = k
        return jnp.tanh(h @ w_i + a_i + jnp.where(mask, bias, 0.0))

    def plain(h, a, bias):
        return jax.lax.scan(lambda c, x: (layer(c, x[0], x[1], (bias, consts[1])), None), h, (a, w_dev))[0]

    def off(h, a, bias):
        return offloaded_scan(layer, h, a, w, (bias, consts[1]))

    f = lambda fn: jax.jit(jax.grad(lambda *args: jnp.sum(fn(*args) ** 3), argnums=(0, 1, 2)))  # noqa: E731
    for x, y in zip(f(plain)(h0, a, consts[0]), f(off)(h0, a, consts[0])):
        assert np.abs(np.asarray(x)).max() > 0
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lora_training_steps_equal_the_device_model():
    """Three LoRA steps on an int4 base, kept on the device and offloaded: only the adapters train, and the two
    runs agree."""
    tx, _ = make_optimizer(OptimSection(learning_rate=1e-2, warmup_steps=0), 10)
    runs = []
    for model in _pair("int4"):
        graphdef, params, base = split_lora(model)
        assert any(x.dtype == jnp.int4 for x in jax.tree.leaves(base))  # the int4 kernels are the frozen base
        base0, params0 = jax.tree.map(np.array, base), jax.tree.map(np.array, params)
        step = make_train_step(graphdef, tx, ObjectiveSection())
        opt_state, losses = tx.init(params), []
        for i in range(3):
            params, opt_state, m = step(params, opt_state, base, SHAPES, train_batch(i), jax.random.key(0), i)
            losses.append(float(m["loss"]))
            assert np.isfinite(losses[-1]) and float(m["grad_norm"]) > 0
        # only the adapters change: every LoRA leaf moved, every base leaf is bit for bit what it was
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, base), base0)
        assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.tree.map(np.array, params)),
                                                           jax.tree.leaves(params0)))
        runs.append((losses, params, base))
    (l0, p0, _), (l1, p1, base1) = runs
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    # the offloaded base is still where it was put: the step's arguments stay in host memory
    assert {x.sharding.memory_kind for k, x in _flat(nnx.State(base1)).items() if is_offloaded(k)} == {HOST}


def test_sampling_loop_equals_the_device_model():
    from qwen_edit_jax.sampling import sample

    on_device, offloaded = _pair("int4", lora=False)
    rng = np.random.default_rng(0)
    kw = dict(noise=jnp.asarray(rng.standard_normal((1, 6, 64)), jnp.float32),
              image_latents=jnp.asarray(rng.standard_normal((1, 6, 64)), jnp.float32),
              prompt_embeds=jnp.asarray(rng.standard_normal((1, 5, TINY.joint_attention_dim)), jnp.float32),
              prompt_embeds_mask=jnp.ones((1, 5), bool),
              negative_prompt_embeds=jnp.asarray(rng.standard_normal((1, 3, TINY.joint_attention_dim)), jnp.float32),
              negative_prompt_embeds_mask=jnp.ones((1, 3), bool), true_cfg_scale=4.0, num_inference_steps=3,
              img_shapes=[(1, 2, 3), (1, 2, 3)])
    np.testing.assert_array_equal(np.asarray(sample(offloaded, **kw)), np.asarray(sample(on_device, **kw)))


def test_lora_files_do_not_merge_into_an_offloaded_base(tmp_path):
    q.save_transformer(q.init_transformer(TINY), tmp_path / "t")
    with pytest.raises(ValueError, match="offloaded base"):  # a clear error, not a crash in host memory
        q.load_transformer(tmp_path / "t", options=ModelOptions(offload="base"), lora=str(tmp_path / "x.safetensors"))


def test_options_validate():
    with pytest.raises(ValueError, match="offload"):
        ModelOptions(offload="all")
    with pytest.raises(ValueError, match="scan_layers"):
        ModelOptions(offload="base", scan_layers=False)
    with pytest.raises(ValueError, match="save_matmuls"):
        ModelOptions(offload="base", remat="save_matmuls")
