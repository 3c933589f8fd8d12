"""Weight-only quantized base (int8 / fp8 e4m3, per-output-channel scales) under fp32 LoRA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwen_edit_jax as q
from qwen_edit_jax.config import INT4_GROUP_SIZE, LoraConfig, ModelOptions, quant_group_size
from qwen_edit_jax.errors import CheckpointError
from qwen_edit_jax.loading.dit import model_from_params
from qwen_edit_jax.models.dit import BASE_PARAMS
from qwen_edit_jax.models.quant import dequantize, quantize, reduced_axis
from qwen_edit_jax.testing.batches import forward_inputs, train_batch
from qwen_edit_jax.training.config import ObjectiveSection, OptimSection
from qwen_edit_jax.training.step import make_optimizer, make_train_step, split_lora
from tests.compare import assert_close, assert_err, rms_err

TINY = q.preset("tiny")
SHAPES = ((1, 2, 3), (1, 3, 2))
# Relative output error (‖y_q − y‖ / ‖y‖, tests/compare.py's rms_err) of the whole tiny model vs the fp32
# model: int8 per-channel rounding error is ≤ scale/2 per weight (~0.4 % of the column max), fp8 e4m3 keeps
# 3 mantissa bits (~2–3 %), int4 has 15 levels per group of 64 rows. Measured on this model (forward / 3-step sampling):
# int8 0.32 % / 0.33 %, fp8 1.2 % / 1.3 %, int4 5.0 % / 5.4 % (re-measured 2026-12-07: the same). The bars sit
# 5–6× above: the error is deterministic for these weights (fixed seeds), and a wrong scale or axis gives ~100 %.
TOL = {"int8": 0.02, "fp8": 0.08, "int4": 0.25}
DEQUANT_TOL = 4e-6  # quantized model vs fp32 on the dequantized weights: measured ≤ 3.7e-7 (int4: 0)
BF16_INT8_TOL = 7e-2  # bf16 on an int8 base vs bf16 on the float base (RMS): measured 6.4e-3
QDTYPE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "int4": jnp.int4}


def _flat(state):
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _ref_int8(w, axis):
    """numpy reference: symmetric per-channel int8."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=axis, keepdims=True)
    s = np.where(amax > 0, amax * np.float32(1.0 / 127.0), np.float32(1.0)).astype(np.float32)
    return np.clip(np.round(w * (np.float32(1.0) / s)), -127, 127).astype(np.int8), s


@pytest.mark.parametrize("shape,axis", [((48, 20), 0), ((3, 48, 3, 20), 1), ((1, 48, 20), 1)])
def test_int8_values_and_scales_are_exact(shape, axis):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    w[..., 0] = 0.0  # an all-zero output channel: scale 1, values 0
    qv, s = jax.jit(lambda x: quantize(x, "int8", axis))(w)
    rq, rs = _ref_int8(w, axis)
    assert qv.dtype == jnp.int8 and s.dtype == jnp.float32 and s.shape == rs.shape
    np.testing.assert_array_equal(np.asarray(s), rs)
    np.testing.assert_array_equal(np.asarray(qv), rq)
    assert reduced_axis(shape, s.shape) == axis
    assert np.abs(np.asarray(qv)).max() == 127  # the column max maps to ±127 exactly
    # dequantization error per weight ≤ half a step
    err = np.abs(np.asarray(dequantize(qv, s)) - w)
    assert np.all(err <= rs / 2 + 1e-7)
    # quantizing the dequantized weights again reproduces the same int8 values (idempotent)
    q2, s2 = quantize(dequantize(qv, s), "int8", axis)
    np.testing.assert_array_equal(np.asarray(q2), rq)


def test_fp8_uses_e4m3_range_and_bounded_error():
    w = np.random.default_rng(1).standard_normal((64, 3, 16)).astype(np.float32)
    qv, s = quantize(w, "fp8", 0)
    assert qv.dtype == jnp.float8_e4m3fn
    v = np.asarray(qv.astype(jnp.float32))
    assert np.all(np.isfinite(v)) and np.abs(v).max() == 448.0
    np.testing.assert_array_equal(np.asarray(s)[0], np.abs(w).max(0) * np.float32(1.0 / 448.0))
    rel = np.abs(np.asarray(dequantize(qv, s)) - w) / np.abs(w).max(0, keepdims=True)
    assert rel.max() <= 2.0**-4 + 1e-6  # 3 mantissa bits: ≤ 1/16 of the column max


def _ref_int4(w, axis, group):
    """numpy reference: symmetric int4 (±7) with one scale per `group` rows of `axis`."""
    w = np.moveaxis(np.asarray(w, np.float32), axis, 0)
    g = w.reshape(w.shape[0] // group, group, *w.shape[1:])
    amax = np.max(np.abs(g), axis=1, keepdims=True)
    s = np.where(amax > 0, amax * np.float32(1.0 / 7.0), np.float32(1.0)).astype(np.float32)
    v = np.clip(np.round(g * (np.float32(1.0) / s)), -7, 7).reshape(w.shape)
    return np.moveaxis(v, 0, axis).astype(np.int8), np.moveaxis(s[:, 0], 0, axis)


@pytest.mark.parametrize("shape,axis", [((256, 20), 0), ((3, 384, 3, 20), 1), ((2, 40, 4), 1)])
def test_int4_values_and_group_scales_are_exact(shape, axis):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    w[..., 0] = 0.0  # an all-zero output channel: scale 1, values 0
    qv, s = jax.jit(lambda x: quantize(x, "int4", axis))(w)
    group = quant_group_size("int4", shape[axis])
    assert group == (INT4_GROUP_SIZE if shape[axis] % INT4_GROUP_SIZE == 0 else shape[axis])  # 40: one group
    rq, rs = _ref_int4(w, axis, group)
    assert qv.dtype == jnp.int4 and s.dtype == jnp.float32 and s.shape == rs.shape
    assert s.shape[axis] == shape[axis] // group and reduced_axis(shape, s.shape) == axis
    np.testing.assert_array_equal(np.asarray(s), rs)
    np.testing.assert_array_equal(np.asarray(qv).astype(np.int8), rq)
    assert np.abs(np.asarray(qv).astype(np.int8)).max() == 7
    err = np.abs(np.asarray(dequantize(qv, s)) - w)  # ≤ half a step of each weight's own group
    assert np.all(err <= np.repeat(rs, group, axis=axis) / 2 + 1e-6)
    q2, _ = quantize(dequantize(qv, s), "int4", axis)  # idempotent
    np.testing.assert_array_equal(np.asarray(q2).astype(np.int8), rq)


def test_int4_kernels_take_half_the_device_bytes_of_int8():
    """Compiled for a TPU (libtpu AOT), an int4 kernel argument is stored packed: half of int8's bytes."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    dev = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1").devices
    sh = NamedSharding(jax.sharding.Mesh(np.array(dev), ("x",)), PartitionSpec())
    sizes = {}
    for dt in (jnp.int8, jnp.int4):
        w = jax.ShapeDtypeStruct((4, 1024, 2048), dt, sharding=sh)
        x = jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16, sharding=sh)
        c = jax.jit(lambda x, w: [x @ w[i].astype(jnp.bfloat16) for i in range(4)]).lower(x, w).compile()
        sizes[dt] = c.memory_analysis().argument_size_in_bytes - 8 * 1024 * 2
    assert sizes[jnp.int8] == 4 * 1024 * 2048 and sizes[jnp.int4] == sizes[jnp.int8] // 2, sizes


def test_options_validate():
    with pytest.raises(ValueError, match="quantize"):
        ModelOptions(quantize="int3")
    with pytest.raises(ValueError, match="fused"):
        ModelOptions(quantize="int8", fuse_qkv=False)


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_quantized_model_layout_and_output_error(mode):
    ref = q.init_transformer(TINY, ModelOptions(), seed=3)
    params = {k: v.get_value() for k, v in _flat(nnx.state(ref, BASE_PARAMS)).items()}
    qm = model_from_params(TINY, ModelOptions(quantize=mode), params)
    flat = _flat(nnx.state(qm, BASE_PARAMS))
    block_kernels = [k for k in flat if k.startswith("transformer_blocks") and k.endswith(".kernel")]
    want = jnp.dtype(QDTYPE[mode])
    assert block_kernels and all(flat[k].get_value().dtype == want for k in block_kernels)
    for k in block_kernels:  # stacked [L, in, *out] kernel, [L, groups, *out] fp32 scale
        s, kernel = flat[k + "_scale"].get_value(), flat[k].get_value()
        groups = kernel.shape[1] // quant_group_size(mode, kernel.shape[1])
        assert s.dtype == jnp.float32 and s.shape == (TINY.num_layers, groups, *kernel.shape[2:])
    if mode == "int4":  # several groups per kernel (D = 128, 4·D for fc2): the grouped path runs
        assert flat["transformer_blocks.img_mlp.fc2.kernel_scale"].get_value().shape[1] == 512 // INT4_GROUP_SIZE > 1
    # the embedders / output projection stay in param_dtype
    assert flat["img_in.kernel"].get_value().dtype == jnp.float32 and "img_in.kernel_scale" not in flat
    # loading quantized exactly what `quantize` gives for each stacked leaf
    k = "transformer_blocks.attn.to_qkv.kernel"
    if mode == "int8":
        rq, rs = _ref_int8(params[k], 1)
        np.testing.assert_array_equal(np.asarray(flat[k].get_value()), rq)
        np.testing.assert_array_equal(np.asarray(flat[k + "_scale"].get_value()), rs)
    if mode == "int4":
        k = "transformer_blocks.img_mlp.fc2.kernel"
        rq, rs = _ref_int4(params[k], 1, INT4_GROUP_SIZE)
        np.testing.assert_array_equal(np.asarray(flat[k].get_value()).astype(np.int8), rq)
        np.testing.assert_array_equal(np.asarray(flat[k + "_scale"].get_value()), rs)
    x = forward_inputs(SHAPES)
    y, yq = np.asarray(ref(**x)), np.asarray(qm(**x))
    assert assert_err(rms_err(yq, y), TOL[mode], f"{mode} forward vs fp32 (RMS)") > 0
    # same as running the fp32 model on the dequantized weights (the scale-after-matmul identity)
    deq = dict(params)
    for k in block_kernels:
        deq[k] = np.asarray(dequantize(flat[k].get_value(), flat[k + "_scale"].get_value()))
    yd = np.asarray(model_from_params(TINY, ModelOptions(), deq)(**x))
    assert_close(yq, yd, DEQUANT_TOL, f"{mode} forward vs fp32 on the dequantized weights")


def test_bf16_activations_on_int8_base():
    ref = q.init_transformer(TINY, ModelOptions(), seed=3)
    params = {k: v.get_value() for k, v in _flat(nnx.state(ref, BASE_PARAMS)).items()}
    opts = dict(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    bf = model_from_params(TINY, ModelOptions(**opts), params)
    qm = model_from_params(TINY, ModelOptions(quantize="int8", **opts), params)
    x = forward_inputs(SHAPES)
    y = np.asarray(ref(**x), np.float32)
    yb, yq = np.asarray(bf(**x), np.float32), np.asarray(qm(**x), np.float32)
    rel_b, rel_q = rms_err(yb, y), rms_err(yq, y)
    # in bf16 the int8 base adds little on top of bf16's own rounding (which is large on a tiny random model)
    assert_err(rms_err(yq, yb), BF16_INT8_TOL, "bf16 int8 base vs bf16 (RMS)")
    assert rel_q < rel_b + TOL["int8"], (rel_q, rel_b)


# each storage format and each adapter mode once (the four combinations add no path: the kernel
# dequantization and the adapters do not interact)
# (int4: tests/test_offload.py::test_lora_training_steps_equal_the_device_model trains it with the same checks)
@pytest.mark.parametrize("mode,qkv_mode", [("int8", "split"), ("fp8", "shared")])
def test_only_lora_trains_on_quantized_base(mode, qkv_mode):
    opts = ModelOptions(quantize=mode, lora=LoraConfig(rank=4, alpha=8, qkv_mode=qkv_mode))
    model = q.init_transformer(TINY, opts, seed=1)
    graphdef, params, base = split_lora(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # adapters stay fp32
    qleaves = [x for x in jax.tree.leaves(base) if x.dtype == QDTYPE[mode]]
    assert qleaves  # quantized kernels live in the frozen base
    tx, _ = make_optimizer(OptimSection(learning_rate=1e-2, warmup_steps=0), 10)
    opt_state = tx.init(params)
    assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim) == 2 * sum(x.size for x in jax.tree.leaves(params))
    base0 = jax.tree.map(np.array, base)
    params0 = jax.tree.map(np.array, params)
    step = make_train_step(graphdef, tx, ObjectiveSection())
    base_ptrs = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(base)]
    key = jax.random.key(0)
    losses = []
    for i in range(3):
        params, opt_state, m = step(params, opt_state, base, SHAPES, train_batch(i), key, i)
        losses.append(float(m["loss"]))
        assert np.isfinite(losses[-1]) and float(m["grad_norm"]) > 0
    # the base is the same buffers, untouched (never donated, never copied per step)
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(base)] == base_ptrs
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, base), base0)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.tree.map(np.array, params)),
                                                     jax.tree.leaves(params0))]
    assert all(moved)


def test_gradients_reach_only_the_lora():
    model = q.init_transformer(TINY, ModelOptions(quantize="int8", lora=LoraConfig(rank=4)), seed=1)
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    x = forward_inputs(SHAPES)

    def loss(lora, base):
        return jnp.mean(nnx.merge(graphdef, lora, base)(**x) ** 2)

    # differentiating the quantized base is impossible (int8 is not differentiable: float0 tangents);
    # the LoRA gets real gradients, B's included
    g = jax.jit(jax.grad(loss))(lora, base)  # one compiled program (eager, every op would compile on its own)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g))
    gb = [np.abs(np.asarray(v)).max() for k, v in _flat(g).items() if k.endswith("lora_B")]
    assert gb and max(gb) > 0


def test_quantize_on_load_from_safetensors_and_self_roundtrip(tmp_path):
    ref = q.init_transformer(TINY, ModelOptions(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16), seed=2)
    q.save_transformer(ref, tmp_path / "t")
    m = q.load_transformer(tmp_path / "t", options=ModelOptions(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                                                                  quantize="int8"))
    params = {k: v.get_value() for k, v in _flat(nnx.state(ref, BASE_PARAMS)).items()}
    flat = _flat(nnx.state(m, BASE_PARAMS))
    k = "transformer_blocks.img_mlp.fc1.kernel"
    rq, rs = _ref_int8(np.asarray(params[k], np.float32), 1)
    np.testing.assert_array_equal(np.asarray(flat[k].get_value()), rq)
    np.testing.assert_array_equal(np.asarray(flat[k + "_scale"].get_value()), rs)
    # a quantized model's own params (values + scales) load back bit for bit
    own = {k: v.get_value() for k, v in flat.items()}
    m2 = model_from_params(TINY, m.options, own)
    for key, v in _flat(nnx.state(m2, BASE_PARAMS)).items():
        a, b = np.asarray(v.get_value()), np.asarray(own[key])
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key
    with pytest.raises(CheckpointError, match="quantize"):  # quantized leaves need a quantized model
        model_from_params(TINY, ModelOptions(param_dtype=jnp.bfloat16), own)
    with pytest.raises(CheckpointError, match="stored as"):  # and the same mode
        model_from_params(TINY, ModelOptions(param_dtype=jnp.bfloat16, quantize="fp8"), own)
    with pytest.raises(ValueError, match="quantized"):  # no silent int8 export in a torch layout
        q.save_transformer(m, tmp_path / "x")
    with pytest.raises(ValueError, match="quantized base cannot"):  # LoRA files merge into float weights only
        q.load_transformer(tmp_path / "t", options=m.options, lora=str(tmp_path / "missing.safetensors"))


def test_quantize_on_load_reads_one_layer_at_a_time():
    """Quantize-on-load never reads (so never places) a whole float stack of a block kernel: one layer a read."""
    from qwen_edit_jax.loading.dit import place_params
    from qwen_edit_jax.weights.checkpoint import is_quantized_kernel
    from qwen_edit_jax.weights.lazy import ArrayParams

    cfg = TINY.__class__(**{**TINY.__dict__, "num_layers": 3})
    ref = q.init_transformer(cfg, ModelOptions(), seed=2)
    params = {k: np.asarray(v.get_value()) for k, v in _flat(nnx.state(ref, BASE_PARAMS)).items()}
    reads = []

    class Recording(ArrayParams):
        def read(self, path, index=None, dtype=None, out=None):
            shape = self.shape(path)
            sl = index[0] if index else slice(None)
            reads.append((path, len(range(*sl.indices(shape[0])))))
            return super().read(path, index, dtype, out)

    model = place_params(Recording(params, cfg), ModelOptions(quantize="int4"), progress=False)
    kernel_reads = [n for p, n in reads if is_quantized_kernel(p)]
    assert kernel_reads and set(kernel_reads) == {1}  # every block-kernel read is one layer
    assert len(kernel_reads) == 3 * sum(is_quantized_kernel(p) for p in params)  # each layer read once
    k = "transformer_blocks.img_mlp.fc2.kernel"
    rq, rs = _ref_int4(params[k], 1, INT4_GROUP_SIZE)
    np.testing.assert_array_equal(np.asarray(model.transformer_blocks.img_mlp.fc2.kernel.get_value()).astype(np.int8), rq)
    np.testing.assert_array_equal(np.asarray(model.transformer_blocks.img_mlp.fc2.kernel_scale.get_value()), rs)


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_quantized_merged_checkpoint_roundtrip(tmp_path, mode):
    from qwen_edit_jax.loading.quantized import QuantizedParams
    from qwen_edit_jax.weights.checkpoint import MergedParams, save_merged
    from qwen_edit_jax.weights.lazy import ArrayParams

    ref = q.init_transformer(TINY, ModelOptions(param_dtype=jnp.bfloat16), seed=4)
    params = {k: np.asarray(v.get_value()) for k, v in _flat(nnx.state(ref, BASE_PARAMS)).items()}
    opts = ModelOptions(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, quantize=mode)
    on_load = model_from_params(TINY, opts, params)  # quantize-on-load from the float weights
    out = save_merged(QuantizedParams(ArrayParams(params, TINY), mode), tmp_path / "m", progress=False)
    mp = MergedParams(out)
    assert mp.quantize == mode and mp.dtype("transformer_blocks.attn.to_qkv.kernel") == np.dtype(
        on_load.transformer_blocks.attn.to_qkv.kernel.get_value().dtype)
    loaded = q.load_transformer(out, options=opts)
    a = {k: np.asarray(v.get_value()) for k, v in _flat(nnx.state(loaded, BASE_PARAMS)).items()}
    b = {k: np.asarray(v.get_value()) for k, v in _flat(nnx.state(on_load, BASE_PARAMS)).items()}
    assert a.keys() == b.keys()
    for k in a:  # converter's quantization == on-load quantization, and the file round trip is bit-exact
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    # half the bytes: quantized block kernels are 1 byte per weight (scales are ~1/in of that); int4 values
    # are half a byte on a device (numpy holds them in a byte each)
    nbytes = lambda d: sum(v.size * jax.dtypes.itemsize_bits(v.dtype) // 8 for v in d.values())  # noqa: E731
    assert nbytes(a) < (0.35 if mode == "int4" else 0.6) * nbytes(params)
    with pytest.raises(CheckpointError, match="quantize"):
        q.load_transformer(out, options=ModelOptions(param_dtype=jnp.bfloat16))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_converter_quantize_cli(tmp_path, capsys, mode):
    import importlib.util
    import os

    from qwen_edit_jax.convert import convert

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ref = q.init_transformer(TINY, ModelOptions(param_dtype=jnp.bfloat16), seed=5)
    q.save_transformer(ref, tmp_path / "src")
    spec = importlib.util.spec_from_file_location("cc", os.path.join(root, "convert", "convert_checkpoint.py"))
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    assert cc.main(["--input", str(tmp_path / "src"), "--output", str(tmp_path / "q8"), "--direction", "to_merged",
                    "--quantize", mode, "--no-progress"]) == 0
    opts = ModelOptions(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, quantize=mode)
    a = _flat(nnx.state(q.load_transformer(tmp_path / "q8", options=opts), BASE_PARAMS))
    b = _flat(nnx.state(q.load_transformer(tmp_path / "src", options=opts), BASE_PARAMS))
    for k in b:  # bit-identical to quantize-on-load from the same source
        x, y = np.asarray(a[k].get_value()), np.asarray(b[k].get_value())
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k
    assert str(a["transformer_blocks.attn.to_qkv.kernel"].get_value().dtype) == mode
    with pytest.raises(ValueError, match="to_merged output only"):
        convert(str(tmp_path / "src"), str(tmp_path / "x"), "to_standard", quantize="int8")
    with pytest.raises(ValueError, match="quantized"):
        convert(str(tmp_path / "q8"), str(tmp_path / "y"), "to_standard")


def test_sampling_loop_on_quantized_base_stays_close():
    """The compiled true-CFG sampling loop runs a quantized base unchanged; at a fixed seed its latents
    stay close to the float base's (fp32 activations isolate the weight error)."""
    from qwen_edit_jax.sampling import sample

    ref = q.init_transformer(TINY, ModelOptions(), seed=6)
    params = {k: v.get_value() for k, v in _flat(nnx.state(ref, BASE_PARAMS)).items()}
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.standard_normal((1, 6, 64)), jnp.float32)
    kw = dict(noise=noise, image_latents=jnp.asarray(rng.standard_normal((1, 6, 64)), jnp.float32),
              prompt_embeds=jnp.asarray(rng.standard_normal((1, 5, TINY.joint_attention_dim)), jnp.float32),
              prompt_embeds_mask=jnp.ones((1, 5), bool),
              negative_prompt_embeds=jnp.asarray(rng.standard_normal((1, 3, TINY.joint_attention_dim)), jnp.float32),
              negative_prompt_embeds_mask=jnp.ones((1, 3), bool), true_cfg_scale=4.0, num_inference_steps=3,
              img_shapes=[(1, 2, 3), (1, 2, 3)])
    base = np.asarray(sample(ref, **kw))
    for mode, tol in TOL.items():
        lat = np.asarray(sample(model_from_params(TINY, ModelOptions(quantize=mode), params), **kw))
        assert np.isfinite(lat).all()
        assert assert_err(rms_err(lat, base), tol, f"{mode} 3-step sampling vs fp32 (RMS)") > 0


def test_training_config_quantize_key():
    import os

    from qwen_edit_jax.training.config import ConfigError, load_config

    yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "configs",
                        "qwen-image-edit.yaml")
    assert load_config(yaml).model_options().quantize is None
    assert load_config(yaml, ["model.quantize=fp8"]).model_options().quantize == "fp8"
    assert load_config(yaml, ["model.quantize=int4", "model.offload=base"]).model_options().offload == "base"
    with pytest.raises(ConfigError, match="quantize"):
        load_config(yaml, ["model.quantize=int2"])
    with pytest.raises(ConfigError, match="offload"):
        load_config(yaml, ["model.offload=all"])
