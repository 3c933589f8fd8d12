"""Qwen2.5-VL encoder: config parsing (both config.json layouts), the key map, loading both key
layouts (single file / index + shards), sharded loading, and the loader's errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import text_encoder_reference as R  # noqa: E402
from tests.compare import assert_close  # noqa: E402
from qwen_edit_jax.errors import CheckpointError  # noqa: E402
from qwen_edit_jax.loading.text_encoder import load_text_encoder_model  # noqa: E402
from qwen_edit_jax.models.text_encoder import Qwen25VLConfig, TextConfig, VisionConfig  # noqa: E402
from qwen_edit_jax.parallel import make_mesh  # noqa: E402
from qwen_edit_jax.weights import text_encoder_keys as keys  # noqa: E402

# Qwen2.5-VL-7B-Instruct / Qwen-Image text_encoder config.json as transformers 4.x wrote it
LEGACY_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}
TINY = Qwen25VLConfig(
    text_config=TextConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
    vision_config=VisionConfig(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                               fullatt_block_indexes=(1, 3)),
    image_token_id=R.IMAGE, video_token_id=R.VIDEO, vision_start_token_id=R.V_START, vision_end_token_id=R.V_END)


@pytest.fixture(scope="module")
def torch_model():
    return R.make_torch_model(seed=1)


@pytest.fixture(scope="module")
def folders(torch_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("te_load")
    t5 = R.save_transformers5(torch_model, str(base / "t5"))
    legacy = R.save_legacy(torch_model, str(base / "legacy"))
    return t5, legacy


def _flat(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


# ---- config ---------------------------------------------------------------------------------
def test_config_legacy_7b_layout_is_the_default():
    assert Qwen25VLConfig.from_dict(LEGACY_7B) == Qwen25VLConfig()


def test_config_transformers5_layout(folders):
    with open(os.path.join(folders[0], "config.json")) as f:
        raw = json.load(f)
    assert "text_config" in raw and "hidden_size" not in raw  # really the nested layout
    assert Qwen25VLConfig.from_dict(raw) == TINY


def test_config_legacy_with_nested_text_config():
    d = dict(LEGACY_7B, text_config={"hidden_size": 3584, "num_hidden_layers": 28, "rms_norm_eps": 1e-6})
    assert Qwen25VLConfig.from_dict(d) == Qwen25VLConfig()


@pytest.mark.parametrize("change,match", [
    (lambda d: d.pop("hidden_size"), "missing .*hidden_size"),
    (lambda d: d.pop("vision_config"), "no vision_config"),
    (lambda d: d.update(model_type="qwen2_vl"), "model_type"),
    (lambda d: d.update(use_sliding_window=True, max_window_layers=4), "sliding-window"),
    (lambda d: d.update(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type"),
    (lambda d: d.update(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 16]}), "mrope_section"),
    (lambda d: d["vision_config"].update(out_hidden_size=1024), "out_hidden_size"),
])
def test_config_errors(change, match):
    d = json.loads(json.dumps(LEGACY_7B))
    change(d)
    with pytest.raises(ValueError, match=match):
        Qwen25VLConfig.from_dict(d)


# ---- key map ----------------------------------------------------------------------------------
def test_key_map_covers_every_parameter_and_round_trips(torch_model, folders):
    model = load_text_encoder_model(folders[0], dtype=jnp.float32)
    flat = _flat(model)
    assert sorted(flat) == sorted(e.flax for e in keys.entries(model.config))
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items() if k != "lm_head.weight"}
    back = keys.to_checkpoint(model.config, flat, "transformers5")
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    assert keys.checkpoint_shapes(model.config, "transformers5") == {k: v.shape for k, v in sd.items()}


def test_read_leaf_slices_equal_whole_leaf_slices(folders):
    from qwen_edit_jax.loading.text_encoder import open_text_encoder_source

    src = open_text_encoder_source(folders[1])
    by = {e.flax: e for e in keys.entries(TINY)}
    for path, index in [("visual.blocks.attn.qkv.kernel", (slice(1, 3), slice(8, 24), slice(1, 3), slice(0, 16))),
                        ("visual.blocks.attn.qkv.bias", (slice(0, 4), slice(0, 2), slice(16, 32))),
                        ("visual.patch_embed.proj.kernel", (slice(100, 700), slice(8, 24))),
                        ("language_model.layers.mlp.down_proj.kernel", (slice(1, 2), slice(48, 96), slice(0, 32))),
                        ("language_model.embed_tokens.embedding", (slice(10, 20), slice(32, 64)))]:
        whole = keys.read_leaf(src, by[path], "legacy")
        np.testing.assert_array_equal(keys.read_leaf(src, by[path], "legacy", index), whole[index], err_msg=path)


# ---- loading -----------------------------------------------------------------------------------
def test_legacy_sharded_layout_loads_the_same_weights(folders):
    with open(os.path.join(folders[1], "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert "visual.patch_embed.proj.weight" in weight_map and len(set(weight_map.values())) > 1
    assert "model.language_model.norm.weight" in load_file(os.path.join(folders[0], "model.safetensors"))
    a = _flat(load_text_encoder_model(folders[0], dtype=jnp.float32))
    b = _flat(load_text_encoder_model(folders[1], dtype=jnp.float32))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bf16_load_runs_close_to_reference(torch_model, folders):
    model = load_text_encoder_model(folders[0])  # default bf16
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    ids, mask, pv, grid = R.make_inputs("right")
    ours = np.asarray(model(ids, mask, pv, grid)).astype(np.float32)
    # measured 2.8e-2 (2026-12-07); 3.6×: bf16 rounding noise, a sanity bar
    assert_close(ours, R.torch_hidden(torch_model, ids, mask, pv, grid), 0.1, "bf16 load vs fp32 transformers", mask)


def test_one_device_mesh_equals_unsharded(folders):
    mesh = make_mesh(fsdp=-1)
    model = load_text_encoder_model(folders[0], dtype=jnp.float32, mesh=mesh)
    leaf = model.language_model.layers.mlp.gate_proj.kernel.get_value()
    assert leaf.sharding.mesh.shape == mesh.shape
    plain = _flat(load_text_encoder_model(folders[0], dtype=jnp.float32))
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(v, plain[k], err_msg=k)


WORKER = r"""
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "tests")
import text_encoder_reference as R
from qwen_edit_jax.loading.text_encoder import load_text_encoder_model
from qwen_edit_jax.parallel import make_mesh, is_sharded
mesh = make_mesh(data=1, fsdp=2, tensor=2)
model = load_text_encoder_model(sys.argv[1], dtype=jnp.float32, mesh=mesh)
assert is_sharded(model.language_model.layers.mlp.gate_proj.kernel.get_value())
assert is_sharded(model.visual.blocks.attn.qkv.kernel.get_value())
ids, mask, pv, grid = R.make_inputs("right")
with jax.set_mesh(mesh):
    out = np.asarray(model(ids, mask, pv, grid))
np.save(sys.argv[2], out)
"""


def test_sharded_load_and_forward_on_four_devices(torch_model, folders, tmp_path):
    """FSDP × tensor parallel over 4 simulated CPU devices: same hidden states as the reference."""
    out_file = str(tmp_path / "out.npy")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", WORKER, folders[1], out_file], env=env, capture_output=True, text=True,
                       timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr[-3000:]
    ids, mask, pv, grid = R.make_inputs("right")
    assert_close(np.load(out_file), R.torch_hidden(torch_model, ids, mask, pv, grid), 3e-5,  # measured 2.7e-6
                 "sharded load and forward on four devices vs transformers", mask)


# ---- errors ------------------------------------------------------------------------------------
def _rewrite(src: str, dst: str, edit) -> str:
    """Copy a single-file folder, editing its tensors {name: array} with `edit`."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.visual.blocks.2.mlp.up_proj.bias"), r"missing tensors \['model.visual.blocks.2.mlp"),
    (lambda t: t.update({"model.visual.blocks.4.norm1.weight": np.ones(32, np.float32)}),
     r"model.safetensors: unexpected tensor 'model.visual.blocks.4.norm1.weight'"),
    (lambda t: t.update({"model.language_model.layers.1.self_attn.k_proj.weight": np.ones((64, 64), np.float32)}),
     r"model.safetensors: tensor 'model.language_model.layers.1.self_attn.k_proj.weight' has shape \[64, 64\]"),
    (lambda t: t.update({"model.language_model.norm.weight": np.ones(64, np.int32)}), "dtype I32"),
    (lambda t: [t.pop(k) for k in list(t)] and t.update(foo=np.ones(2, np.float32)), "no Qwen2.5-VL tensor names"),
])
def test_loader_errors_name_file_and_key(folders, tmp_path, edit, match):
    bad = _rewrite(folders[0], str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError, match=match):
        load_text_encoder_model(bad, dtype=jnp.float32)


def test_loader_errors_for_folder_problems(folders, tmp_path):
    with pytest.raises(CheckpointError, match=r"text encoder config .* not found: .*config\.json"):
        load_text_encoder_model(str(tmp_path), dtype=jnp.float32)
    legacy = shutil.copytree(folders[1], str(tmp_path / "legacy"))
    with open(os.path.join(legacy, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(legacy, shard))
    with pytest.raises(CheckpointError, match=f"shard {shard} is missing"):
        load_text_encoder_model(legacy, dtype=jnp.float32)
    with open(os.path.join(legacy, "config.json"), "w") as f:
        json.dump({"model_type": "qwen2_5_vl", "vision_config": {}}, f)
    with pytest.raises(CheckpointError, match="config.json text config: missing"):
        load_text_encoder_model(legacy, dtype=jnp.float32)
