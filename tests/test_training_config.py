"""Training config: YAML + overrides, clear errors for bad values, the CLI's error exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qwen_edit_jax.training.config import ConfigError, TrainConfig, config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "train", "configs", "latent_demo.yaml")
IMAGE_DEMO = os.path.join(ROOT, "train", "configs", "demo.yaml")
REAL = os.path.join(ROOT, "train", "configs", "qwen-image-edit.yaml")
MIN = {"model": {"path": "m"}, "data": {"path": "d"}}


def test_shipped_configs_load():
    demo = load_config(DEMO)
    assert demo.model.path and demo.data.path
    assert demo.lora_config().qkv_mode == "split"
    main_job = load_config(IMAGE_DEMO)  # scripts/demo.sh: validation grids of the four held-out edits
    assert main_job.validation.every > 0 and len(main_job.validation.prompts) == 4
    assert all(len(p.images) == 1 for p in main_job.validation.prompts)
    real = load_config(REAL)
    assert real.optim.learning_rate == 1e-4 and real.optim.weight_decay == 0.01
    assert real.objective.timestep_sampling == "diffsynth" and real.model.param_dtype == "bfloat16"
    opts = real.model_options()
    assert opts.lora.rank == real.lora.rank and opts.remat == real.model.remat


def test_roundtrip_and_overrides(tmp_path):
    cfg = load_config(DEMO, ["optim.learning_rate=3e-4", "lora.targets=[to_qkv, img_mod]", "train.max_steps=7",
                             "objective.shift_terminal=null", "mesh.fsdp=2"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.lora.targets == ("to_qkv", "img_mod")
    assert cfg.train.max_steps == 7 and cfg.objective.shift_terminal is None and cfg.mesh.fsdp == 2
    d = cfg.to_dict()
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    # run.json carries an extra informational section and still loads as a config
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**d, "run_info": {"anything": 1}}))
    assert load_config(path) == cfg


def test_yaml_exponent_strings_are_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {path: m}\ndata: {path: d}\noptim: {learning_rate: 1e-4, eps: 1e-8}\n")
    cfg = load_config(p)
    assert cfg.optim.learning_rate == 1e-4 and cfg.optim.eps == 1e-8


@pytest.mark.parametrize("patch,message", [
    ({"optim": {"learnin_rate": 1e-4}}, r"unknown config key\(s\) \['optim\.learnin_rate'\]"),
    ({"optimizer": {}}, r"unknown config key\(s\) \['optimizer'\]"),
    ({"optim": {"learning_rate": "fast"}}, r"optim\.learning_rate='fast' is not a number"),
    ({"optim": {"learning_rate": -1.0}}, r"optim\.learning_rate=-1\.0: must be positive"),
    ({"optim": {"grad_accum": 0}}, r"optim\.grad_accum=0: must be >= 1"),
    ({"optim": {"schedule_steps": 0}}, r"optim\.schedule_steps=0: must be >= 1"),
    ({"optim": {"schedule": "exp"}}, r"optim\.schedule='exp' is not one of \['constant', 'cosine', 'linear'\]"),
    ({"lora": {"rank": 0}}, r"lora\.rank=0: must be positive"),
    ({"lora": {"rank": 4.5}}, r"lora\.rank=4\.5 is not an integer"),
    ({"lora": {"targets": ["to_q"]}}, r"unknown LoRA targets \['to_q'\]"),
    ({"lora": {"qkv_mode": "fused"}}, r"lora\.qkv_mode='fused' is not one of"),
    ({"objective": {"timestep_sampling": "sigmoid"}}, r"objective\.timestep_sampling='sigmoid' is not one of"),
    ({"objective": {"shift_terminal": 1.5}}, r"objective\.shift_terminal=1\.5: must be in \(0, 1\)"),
    ({"model": {"path": ""}}, r"model\.path='': required"),
    ({"model": {"param_dtype": "int8"}}, r"model\.param_dtype='int8': choose one of"),
    ({"model": {"remat": "some"}}, r"model\.remat='some' is not one of"),
    ({"data": {"batch_size": 0}}, r"data\.batch_size=0: must be positive"),
    ({"data": {"text_buckets": []}}, r"data\.text_buckets=\[\]"),
    ({"data": {"shuffle": "yes"}}, r"data\.shuffle='yes' is not true/false"),
    ({"data": {"datasets": [{"path": "b", "repeats": 2}]}}, r"set data\.path \(one cache\) or data\.datasets"),
    ({"data": {"path": "", "datasets": [{"path": "b", "repeats": 0}]}},
     r"data\.datasets\[0\]\.repeats=0: must be >= 1"),
    ({"data": {"path": "", "datasets": [{"repeats": 2}]}}, r"data\.datasets\[0\]\.path='': required"),
    ({"data": {"path": "", "datasets": [{"path": "b", "weight": 2}]}},
     r"unknown config key\(s\) \['data\.datasets\[0\]\.weight'\]"),
    ({"data": {"path": ""}}, r"data\.path='': required .*or data\.datasets"),
    ({"data": {"caption_dropout": 1.0}}, r"data\.caption_dropout=1\.0: must be in \[0, 1\)"),
    ({"objective": {"mask_min_weight": -0.1}}, r"objective\.mask_min_weight=-0\.1: must be in \[0, 1\]"),
    ({"train": {"save_every": 0}}, r"train\.save_every=0: must be >= 1"),
    ({"mesh": {"fsdp": 0}}, r"mesh\.fsdp=0: must be >= 1 or -1"),
    ({"export": {"formats": ["onnx"]}}, r"export\.formats\[0\]='onnx' is not one of"),
    ({"lora": {"type": "dora"}, "export": {"formats": ["kohya"]}}, r"export\.formats=\['kohya'\]: DoRA is written"),
    ({"lora": {"type": "lokr"}, "export": {"formats": ["diffusers"]}}, r"export\.formats=\['diffusers'\]: LoKr"),
    ({"demo": {"enabled": True}}, r"unknown config key\(s\) \['demo'\]"),  # the trainer makes no inputs
])
def test_bad_values_name_the_key(patch, message):
    d = json.loads(json.dumps(MIN))
    for section, values in patch.items():
        d.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(d, source="my.yaml")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(DEMO, ["optim.learning_rate"])


def test_export_formats_default_to_the_adapter_type():
    assert TrainConfig().export_formats() == ("diffusers",)
    lokr = json.loads(json.dumps(MIN)) | {"lora": {"type": "lokr"}}
    assert config_from_dict(lokr).export_formats() == ("comfyui",)  # LyCORIS keys, no extra setting
    assert config_from_dict(lokr | {"export": {"formats": ["kohya"]}}).export_formats() == ("kohya",)


def test_defaults_follow_the_recipe():
    cfg = TrainConfig()
    assert (cfg.optim.learning_rate, cfg.optim.weight_decay) == (1e-4, 0.01)
    assert cfg.objective.timestep_sampling == "diffsynth" and cfg.objective.mu == 0.8
    assert cfg.objective.shift_terminal == 0.02 and cfg.lora.qkv_mode == "split"
    assert cfg.lora.targets == ("to_qkv", "add_qkv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp")


def test_cli_reports_bad_config_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "train/train_lora.py", "--config", DEMO, "--output-dir", str(tmp_path / "o"),
                        "optim.learning_rate=-3"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2
    assert "error:" in r.stderr and "optim.learning_rate=-3.0: must be positive" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "o")
