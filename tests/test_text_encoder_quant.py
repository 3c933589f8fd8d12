"""The int8 / fp8 weight-only Qwen2.5-VL prompt encoder: which leaves are quantized and how
(`models/quant.quantize` bit for bit), the embeddings' error against the float model, quantize-on-load
equal to quantizing the loaded float weights (plain and on a mesh), and `cache_dataset.py --quantize`
end to end on the tiny repo, with its one-line error for a bad value."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_edit_jax.testing.repo import write_tiny_edit_repo
from qwen_edit_jax.loading.text_encoder import load_text_encoder, load_text_encoder_model
from qwen_edit_jax.models.quant import quantize, reduced_axis
from qwen_edit_jax.models.text_encoder import EncoderOptions, Qwen25VLConfig, Qwen25VLEncoder, TextConfig, VisionConfig
from qwen_edit_jax.parallel import make_mesh
from qwen_edit_jax.cache_format import CachedDataset
from test_caching import folder_dataset
from tests.compare import rms_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
import cache_dataset as cli  # noqa: E402

TINY = Qwen25VLConfig(
    text_config=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
    vision_config=VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                               fullatt_block_indexes=(1,)),
    image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
# every linear but the patch embedding (the stacked ones with a leading layers axis)
QUANTIZED = {f"language_model.layers.{m}.kernel" for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")} | {f"visual.blocks.{m}.kernel" for m in (
        "attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {
    "visual.merger.mlp_0.kernel", "visual.merger.mlp_2.kernel"}
# measured (CPU, jax 0.10.2): int8 weights with fp32 activations against fp32 on the tiny repo, relative L2
# error (tests/compare.py's rms_err) of the prompt embeddings: 0.023 for `_prompt` (text + one image),
# 0.023 / 0.023 for the two cached samples below; tolerance ~10x (a wrong scale or axis gives ~1)
INT8_REL_TOL = 0.25


def _flat(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _prompt(config: Qwen25VLConfig, seed: int = 0):
    """input_ids [1, L] (text around one 112² image's 16 pad tokens), pixel_values [64, 1176], grid [1, 3]."""
    rng = np.random.default_rng(seed)
    text = rng.integers(0, 100, 24)
    ids = np.concatenate([text[:12], [config.vision_start_token_id], [config.image_token_id] * 16,
                          [config.vision_end_token_id], text[12:]])[None].astype(np.int32)
    pixels = rng.standard_normal((64, config.vision_config.patch_dim)).astype(np.float32)
    return ids, pixels, np.asarray([[1, 8, 8]])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return str(write_tiny_edit_repo(tmp_path_factory.mktemp("repo") / "edit", "edit"))


# int8 runs first and pays the eager initialisation's op-by-op compiles (17 s serial, 111 s in CI); fp8 hits the cache
@pytest.mark.parametrize("mode", [pytest.param("int8", marks=pytest.mark.slow), "fp8"])
def test_quantized_leaves_are_models_quant_of_the_float_ones(mode):
    """Same seed: every large kernel is `quantize(float kernel, mode, input axis)`; the rest unchanged."""
    f = _flat(Qwen25VLEncoder(TINY, EncoderOptions(), rngs=nnx.Rngs(3)))
    q = _flat(Qwen25VLEncoder(TINY, EncoderOptions(quantize=mode), rngs=nnx.Rngs(3)))
    assert {k for k in q if k.endswith("kernel_scale")} == {k + "_scale" for k in QUANTIZED}
    assert set(q) == set(f) | {k + "_scale" for k in QUANTIZED}
    for k, w in f.items():
        if k in QUANTIZED:
            stacked = k.split(".")[1] in ("layers", "blocks")
            axis = 1 if stacked else 0
            assert reduced_axis(q[k].shape, q[k + "_scale"].shape) == axis
            values, scale = quantize(jnp.asarray(w), mode, axis)
            assert q[k].dtype == values.dtype and q[k + "_scale"].dtype == np.float32
            np.testing.assert_array_equal(q[k], np.asarray(values), err_msg=k)
            np.testing.assert_array_equal(q[k + "_scale"], np.asarray(scale), err_msg=k)
        else:  # embeddings, norms, biases, the patch embedding
            np.testing.assert_array_equal(q[k], w, err_msg=k)


def test_scale_is_sharded_like_the_bias():
    model = nnx.eval_shape(lambda: Qwen25VLEncoder(TINY, EncoderOptions(quantize="int8"), rngs=nnx.Rngs(0)))
    lin = model.language_model.layers.self_attn.q_proj
    assert lin.kernel_scale.out_sharding == ("layers", None, *lin.bias.out_sharding[1:])
    assert lin.kernel_scale.out_sharding[2:] == lin.kernel.out_sharding[2:]
    assert model.visual.merger.mlp_0.kernel_scale.out_sharding == (None, "mlp")


def test_quantize_option_errors():
    with pytest.raises(ValueError, match=r"quantize must be None or one of \['int8', 'fp8'\], got 'int4'"):
        EncoderOptions(quantize="int4")


def test_quantize_on_load_equals_quantizing_the_loaded_float_model(repo):
    te = os.path.join(repo, "text_encoder")
    f = _flat(load_text_encoder_model(te, dtype=jnp.float32))
    for dtype in (jnp.float32, jnp.bfloat16):  # kernels are read as stored (fp32) whatever the model dtype
        q = _flat(load_text_encoder_model(te, dtype=dtype, quantize="int8"))
        assert set(q) == set(f) | {k + "_scale" for k in QUANTIZED}
        for k, w in f.items():
            if k in QUANTIZED:
                values, scale = quantize(jnp.asarray(w), "int8", reduced_axis(w.shape, q[k + "_scale"].shape))
                np.testing.assert_array_equal(q[k], np.asarray(values), err_msg=k)
                np.testing.assert_array_equal(q[k + "_scale"], np.asarray(scale), err_msg=k)
            else:
                assert q[k].dtype == jnp.dtype(dtype), k
                np.testing.assert_array_equal(q[k], w.astype(dtype), err_msg=k)
    mesh = make_mesh(fsdp=-1)
    sharded = load_text_encoder_model(te, dtype=jnp.float32, mesh=mesh, quantize="int8")
    assert sharded.language_model.layers.mlp.up_proj.kernel_scale.get_value().sharding.mesh.shape == mesh.shape
    for k, v in _flat(sharded).items():
        np.testing.assert_array_equal(v, q[k].astype(v.dtype) if k in QUANTIZED or k.endswith("_scale")
                                      else f[k], err_msg=k)


def test_int8_embeddings_close_to_float(repo):
    """The measured error of int8 weights (fp32 activations) stays under its tolerance, and is not zero."""
    te = os.path.join(repo, "text_encoder")
    f = load_text_encoder_model(te, dtype=jnp.float32)
    q = load_text_encoder_model(te, dtype=jnp.float32, quantize="int8")
    ids, pixels, grid = _prompt(f.config)
    a, b = np.asarray(f(ids, None, pixels, grid)), np.asarray(q(ids, None, pixels, grid))
    err = rms_err(b, a)
    assert 1e-4 < err < INT8_REL_TOL, err


def test_load_text_encoder_rejects_a_bad_mode_before_reading(tmp_path):
    with pytest.raises(ValueError, match="got 'int3'"):
        load_text_encoder(tmp_path / "missing", quantize="int3")


FAST = ["--resolution", "64", "--control-resolution", "target", "--dtype", "float32", "--batch-size", "2",
        "--no-progress"]


def test_cache_dataset_quantize_int8_end_to_end(tmp_path, repo, capsys):
    """`--quantize int8` caches the same samples and latents (the VAE is not quantized) with prompt
    embeddings close to the float run's; the option is recorded in the cache's metadata."""
    data = folder_dataset(tmp_path / "d", [("a", (64, 64), "make it blue"), ("b", (64, 48), "add a hat")])
    runs = {}
    for name, extra in (("float", []), ("int8", ["--quantize", "int8"])):
        rc = cli.main(["--dataset", data, "--model", repo, "--output", str(tmp_path / name), *FAST, *extra])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert out.startswith("done: 2 samples"), out
        runs[name] = CachedDataset(tmp_path / name)
    assert runs["int8"].metadata["text_encoder_quantize"] == "int8"
    assert "text_encoder_quantize" not in runs["float"].metadata
    for i in range(2):
        a, b = runs["float"][i], runs["int8"][i]
        assert a.sample_id == b.sample_id
        np.testing.assert_array_equal(a.target, b.target)
        np.testing.assert_array_equal(a.prompt_mask, b.prompt_mask)
        err = rms_err(b.prompt_embeds[b.prompt_mask], a.prompt_embeds[a.prompt_mask])
        assert 1e-4 < err < INT8_REL_TOL, err


def test_cache_dataset_bad_quantize_is_one_line(tmp_path, repo, capsys):
    data = folder_dataset(tmp_path / "d", [("a", (64, 64), "x")])
    rc = cli.main(["--dataset", data, "--model", repo, "--output", str(tmp_path / "out"), *FAST,
                   "--quantize", "int4"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert err.strip().splitlines() == ["error: --quantize 'int4': expected one of int8, fp8"]
    assert not os.path.exists(tmp_path / "out")


def test_cache_dataset_help_names_the_option():
    text = cli.build_parser().format_help()
    assert "--quantize MODE" in text and "int8" in text and "Default: none" in text
    assert jax.default_backend() == "cpu"
