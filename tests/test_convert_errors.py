"""Bad input to the converter: one-paragraph errors naming file and key, and nothing left at OUT."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import qwen_edit_jax as q
from qwen_edit_jax.weights import checkpoint
from qwen_edit_jax.weights.safetensors_io import TensorSource
from tests.torch_reference import make_torch_model, save_torch_model

TINY = q.preset("tiny")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("convert_cli", os.path.join(ROOT, "convert", "convert_checkpoint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tm():
    return make_torch_model(TINY, seed=8)


@pytest.fixture(scope="module")
def base_tensors(tmp_path_factory, tm):
    path = save_torch_model(tm, tmp_path_factory.mktemp("b") / "base")
    src = TensorSource.open(path)
    return {k: src.get(k) for k in src.keys()}


def folder(tmp_path, tensors, name="in", config=TINY):
    d = tmp_path / name
    os.makedirs(d)
    save_file(tensors, str(d / "diffusion_pytorch_model.safetensors"))
    if config is not None:
        config.to_json(d / "config.json")
    return str(d)


def run_fail(cli, capsys, tmp_path, *args, out="out"):
    """Run the CLI expecting failure; check the error contract and that nothing was left behind."""
    out_path = str(tmp_path / out)
    before = set(os.listdir(tmp_path))
    rc = cli.main(["--no-progress", "--output", out_path, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one paragraph, no traceback
    assert "Traceback" not in err
    after = set(os.listdir(tmp_path))
    leftovers = [f for f in after - before if f.startswith(f".{out}.")]
    assert not leftovers, leftovers
    return err, out_path


def test_truncated_shard(cli, capsys, tmp_path, tm):
    path = save_torch_model(tm, tmp_path / "sharded", sharded=True)
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[2]
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, shard)) // 2)
    err, out = run_fail(cli, capsys, tmp_path, "--input", path, "--direction", "to_merged")
    assert shard in err and "not a readable safetensors file" in err
    assert not os.path.exists(out)


def test_corrupt_header(cli, capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    err, _ = run_fail(cli, capsys, tmp_path, "--input", str(bad), "--direction", "to_merged", "--config", "tiny")
    assert "bad.safetensors" in err and "not a readable safetensors file" in err


def test_missing_shard(cli, capsys, tmp_path, tm):
    path = save_torch_model(tm, tmp_path / "sharded", sharded=True)
    shard = min(f for f in os.listdir(path) if f.endswith(".safetensors"))
    os.remove(os.path.join(path, shard))
    err, _ = run_fail(cli, capsys, tmp_path, "--input", path, "--direction", "to_merged")
    assert "diffusion_pytorch_model.safetensors.index.json" in err and shard in err and "missing" in err


def test_missing_key(cli, capsys, tmp_path, base_tensors):
    t = dict(base_tensors)
    del t["transformer_blocks.1.attn.to_k.bias"]
    err, _ = run_fail(cli, capsys, tmp_path, "--input", folder(tmp_path, t), "--direction", "to_merged")
    assert "missing 1 tensors" in err and "transformer_blocks.1.attn.to_k.bias" in err and "in" in err


def test_unexpected_key(cli, capsys, tmp_path, base_tensors):
    t = dict(base_tensors, **{"transformer_blocks.0.attn.extra.weight": np.zeros((2, 2), np.float32)})
    err, _ = run_fail(cli, capsys, tmp_path, "--input", folder(tmp_path, t), "--direction", "to_standard")
    assert "unexpected tensors" in err and "transformer_blocks.0.attn.extra.weight" in err


def test_unexpected_key_outside_prefix(cli, capsys, tmp_path, base_tensors):
    t = {"diffusion_model." + k: v for k, v in base_tensors.items()}
    t["first_stage_model.decoder.conv.weight"] = np.zeros((2,), np.float32)
    p = str(tmp_path / "comfy.safetensors")
    save_file(t, p)
    err, _ = run_fail(cli, capsys, tmp_path, "--input", p, "--direction", "to_merged", "--config", "tiny")
    assert "comfy.safetensors" in err and "first_stage_model.decoder.conv.weight" in err


def test_wrong_shape(cli, capsys, tmp_path, base_tensors):
    t = dict(base_tensors)
    t["transformer_blocks.0.attn.to_q.weight"] = t["transformer_blocks.0.attn.to_q.weight"][:, :-1].copy()
    err, _ = run_fail(cli, capsys, tmp_path, "--input", folder(tmp_path, t), "--direction", "to_merged")
    assert "diffusion_pytorch_model.safetensors" in err and "transformer_blocks.0.attn.to_q.weight" in err
    assert "(128, 127)" in err and "(128, 128)" in err


@pytest.mark.parametrize("change", [{"num_layers": 3}, {"joint_attention_dim": 32}])
def test_config_does_not_match_weights(cli, capsys, tmp_path, base_tensors, change):
    import dataclasses

    path = folder(tmp_path, base_tensors, config=dataclasses.replace(TINY, **change))
    err, _ = run_fail(cli, capsys, tmp_path, "--input", path, "--direction", "to_merged")
    assert "config" in err and path in err
    assert ("transformer_blocks.2" in err) if "num_layers" in change else ("txt_in.weight" in err or "txt_norm" in err)


def test_single_file_without_config_needs_variant(cli, capsys, tmp_path, base_tensors):
    p = str(tmp_path / "single.safetensors")
    save_file(base_tensors, p)
    err, _ = run_fail(cli, capsys, tmp_path, "--input", p, "--direction", "to_merged")
    assert "single.safetensors" in err and "no config.json" in err and "zero_cond_t" in err and "--config" in err
    err, _ = run_fail(cli, capsys, tmp_path, "--input", p, "--direction", "to_merged", "--config", "qwen-edit-2511")
    assert "qwen-edit-2511" in err and "preset" in err


def test_lora_matching_nothing(cli, capsys, tmp_path):
    p = str(tmp_path / "flux_lora.safetensors")
    save_file({"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": np.ones((2, 8), np.float32),
               "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": np.ones((8, 2), np.float32)}, p)
    err, _ = run_fail(cli, capsys, tmp_path, "--input", p, "--direction", "to_standard", out="o.safetensors")
    assert "flux_lora.safetensors" in err and "match nothing" in err and "single_transformer_blocks.0.proj_mlp" in err


def test_lora_missing_up_weight(cli, capsys, tmp_path):
    p = str(tmp_path / "half.safetensors")
    save_file({"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": np.ones((2, 128), np.float32),
               "lora_unet_transformer_blocks_0_attn_to_q.alpha": np.asarray(2.0, np.float32)}, p)
    err, _ = run_fail(cli, capsys, tmp_path, "--input", p, "--direction", "to_merged", out="o.safetensors")
    assert "half.safetensors" in err and "transformer_blocks.0.attn.to_q" in err and "lora_B" in err


def test_kohya_format_is_not_for_base_models(cli, capsys, tmp_path, base_tensors):
    err, _ = run_fail(cli, capsys, tmp_path, "--input", folder(tmp_path, base_tensors), "--direction", "to_standard",
                      "--format", "kohya")
    assert "kohya" in err and "LoRA key style" in err


def test_broken_merged_checkpoint(cli, capsys, tmp_path, base_tensors):
    import shutil

    merged = str(tmp_path / "merged")
    assert cli.main(["--no-progress", "--input", folder(tmp_path, base_tensors), "--output", merged,
                     "--direction", "to_merged"]) == 0
    capsys.readouterr()
    shutil.rmtree(os.path.join(merged, checkpoint.PARAMS_DIR))
    err, _ = run_fail(cli, capsys, tmp_path, "--input", merged, "--direction", "to_standard")
    assert merged in err and "params/" in err


def test_existing_output_untouched_and_failed_overwrite_keeps_it(cli, capsys, tmp_path, base_tensors, monkeypatch):
    src = folder(tmp_path, base_tensors)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    err, _ = run_fail(cli, capsys, tmp_path, "--input", src, "--direction", "to_merged")
    assert "already exists" in err and (out / "keep.txt").read_text() == "precious"

    # A run that dies half-way (disk error while streaming) leaves the old OUT as it was, and no temp files.
    from qwen_edit_jax.weights import loader

    calls = {"n": 0}
    real = loader.TorchLayoutParams.read

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError("No space left on device (simulated)")
        return real(self, *a, **k)

    monkeypatch.setattr(loader.TorchLayoutParams, "read", flaky)
    for direction in ("to_merged", "to_standard"):
        calls["n"] = 0
        err, _ = run_fail(cli, capsys, tmp_path, "--input", src, "--direction", direction, "--overwrite")
        assert "No space left on device" in err
        assert sorted(os.listdir(out)) == ["keep.txt"]
        calls["n"] = 0
        err, fresh = run_fail(cli, capsys, tmp_path, "--input", src, "--direction", direction, out="fresh")
        assert not os.path.exists(fresh)


def test_bad_arguments(cli, capsys, tmp_path, base_tensors):
    src = folder(tmp_path, base_tensors)
    err, _ = run_fail(cli, capsys, tmp_path, "--input", str(tmp_path / "nope"), "--direction", "to_merged")
    assert "nope" in err and "no such file" in err
    err, _ = run_fail(cli, capsys, tmp_path, "--input", src, "--direction", "to_merged", "--dtype", "int4")
    assert "int4" in err
    rc = cli.main(["--no-progress", "--input", src, "--output", src, "--direction", "to_merged"])
    assert rc == 2 and "is the input" in capsys.readouterr().err


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "convert_checkpoint.py"), "--input", str(bad),
                        "--output", str(tmp_path / "o"), "--direction", "to_merged", "--config", "tiny"],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "garbage.safetensors" in r.stderr
    assert not os.path.exists(tmp_path / "o")


def test_lora_json_metadata_not_required(tmp_path):
    """A LoRA with unparsable PEFT metadata still reads (scale 1), it is not an error."""
    from qwen_edit_jax.lora import read_lora

    p = str(tmp_path / "m.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, 128), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((128, 2), np.float32)}, p,
              metadata={"lora_adapter_metadata": "{broken"})
    assert read_lora(p)["transformer_blocks.0.attn.to_q"].scale == 1.0


def test_format_with_a_base_to_merged_is_refused(cli, capsys, tmp_path, base_tensors):
    """A merged Orbax checkpoint has no key style: `--format` there is an error, not silently ignored."""
    err, out = run_fail(cli, capsys, tmp_path, "--input", folder(tmp_path, base_tensors), "--direction", "to_merged",
                        "--format", "kohya")
    assert "--format kohya does not apply to a base model's to_merged output" in err
    assert not os.path.exists(out)


def test_not_a_checkpoint_says_what_it_holds(cli, capsys, tmp_path):
    """No base-model anchor and no LoRA either: the message lists what the file does hold."""
    p = str(tmp_path / "vae.safetensors")
    save_file({"decoder.conv_in.weight": np.ones((2, 2), np.float32),
               "decoder.conv_in.bias": np.ones(2, np.float32)}, p)
    err, _ = run_fail(cli, capsys, tmp_path, "--input", p, "--direction", "to_merged", "--config", "tiny")
    assert "not a Qwen-Image transformer checkpoint; it holds 2 tensors, e.g. ['decoder.conv_in.bias', " \
           "'decoder.conv_in.weight']" in err


def test_a_lora_where_a_base_model_belongs_says_so(tmp_path):
    """Loading a LoRA file (any name) as the base model: the error says it found a LoRA and what to do."""
    p = str(tmp_path / "my_lora")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, 128), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((128, 2), np.float32)}, p)
    with pytest.raises(q.errors.CheckpointError, match=r"it holds 2 tensors, 2 of them LoRA factors \(e\.g\. "
                                                       r"\['transformer\.transformer_blocks\.0\.attn\.to_q\.lora_A"
                                                       r"\.weight'.*a LoRA, not a base model; load a base model here "
                                                       r"and pass the LoRA separately"):
        q.load_transformer(p, config=TINY)
