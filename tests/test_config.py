"""DiTConfig reads diffusers config.json files; presets; errors."""

import json

import pytest

from qwen_edit_jax import DiTConfig, LoraConfig, ModelOptions, preset

# The published configs, as they appear in each model's transformer/config.json on the Hugging Face Hub.
QWEN_IMAGE = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.34.0.dev0",
              "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False,
              "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60,
              "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 768}
EDIT_2511 = {**{k: v for k, v in QWEN_IMAGE.items() if k != "pooled_projection_dim"},
             "_diffusers_version": "0.36.0.dev0", "zero_cond_t": True}


@pytest.mark.parametrize("raw,name", [(QWEN_IMAGE, "qwen-image"), (EDIT_2511, "qwen-image-edit-2511")])
def test_from_json_matches_preset(tmp_path, raw, name):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = DiTConfig.from_json(tmp_path)
    assert cfg == preset(name)
    assert cfg.inner_dim == 3072 and cfg.out_features == 64


def test_round_trip(tmp_path):
    cfg = preset("tiny")
    cfg.to_json(tmp_path / "config.json")
    assert DiTConfig.from_json(tmp_path / "config.json") == cfg


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        DiTConfig.from_dict({**QWEN_IMAGE, "hidden_size": 3})
    with pytest.raises(ValueError, match="use_layer3d_rope"):
        DiTConfig.from_dict({**QWEN_IMAGE, "use_layer3d_rope": True})
    with pytest.raises(ValueError, match="must sum to attention_head_dim"):
        DiTConfig(axes_dims_rope=(16, 56, 50))
    with pytest.raises(FileNotFoundError):
        DiTConfig.from_json(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("qwen-image-edit-9999")
    with pytest.raises(ValueError, match="remat"):
        ModelOptions(remat="sometimes")
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoraConfig(targets=("to_q",))
    assert LoraConfig(rank=8, alpha=16).scale == 2.0
    assert ModelOptions(dtype="bf16").dtype.name == "bfloat16"
