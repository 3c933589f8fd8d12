"""Loading the VAE: diffusers `vae/` folders (fp32 and bf16 files, loaded as fp32 or bf16), single files in
diffusers and in Wan-2.1 / ComfyUI naming (with a prefix), clear errors, input checks, and batches split on
8 simulated devices (subprocess: the device count must be set before jax starts).

Loaded parameters are compared with the torch model's own tensors (last temporal tap of the causal 3D
kernels, OIHW → HWIO), and one load is run end to end against diffusers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from qwen_edit_jax.errors import CheckpointError
from qwen_edit_jax.loading.vae import check_image_shape, init_vae, load_vae
from qwen_edit_jax.models.vae import VAEConfig
from tests.background import Job
from tests.compare import assert_close, assert_err
from tests.vae_reference import TINY_CONFIGS, numpy_state, to_bf16, torch_decode, torch_encode, torch_vae

CFG = TINY_CONFIGS["two_levels_rgba"]  # has the unused time_conv tensors (3D resample modes)
WORKER = Path(__file__).with_name("vae_sharding_worker.py")


@pytest.fixture(scope="module")
def ref():
    return torch_vae(CFG, seed=11)


@pytest.fixture(scope="module")
def folders(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(root / "fp32")
    to_bf16(ref).save_pretrained(root / "bf16")
    return root


def torch_as_flax(model) -> dict[str, np.ndarray]:
    """The expected Flax parameters, straight from the torch modules: {dotted path: array}."""
    out = {}
    for name, t in model.state_dict().items():
        if ".time_conv." in name:
            continue
        a = t.float().numpy()
        path = name.replace("resample.1.", "resample.")
        if name.endswith("gamma"):
            out[path] = a.reshape(-1)
        elif name.endswith("weight"):
            out[path[: -len("weight")] + "kernel"] = (a[:, :, -1] if a.ndim == 5 else a).transpose(2, 3, 1, 0)
        else:
            out[path] = a
    return out


def loaded_params(vae) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(vae.model))}


def assert_params_equal(vae, model, dtype):
    got, want = loaded_params(vae), torch_as_flax(model)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == np.dtype(dtype), k
        np.testing.assert_array_equal(got[k].astype(np.float32), want[k], err_msg=k)


def original_names(state: dict[str, np.ndarray], config: VAEConfig) -> dict[str, np.ndarray]:
    from qwen_edit_jax.weights.vae_keys import vae_keys

    to_orig = {k.name: k.original for k in vae_keys(config)}
    return {to_orig[k]: v for k, v in state.items()}


# ---- happy paths ------------------------------------------------------------------------------------------
def test_diffusers_folder_fp32_runs_like_diffusers(ref, folders):
    vae = load_vae(folders / "fp32", dtype=jnp.float32)
    assert vae.config == VAEConfig(**CFG) and vae.dtype == jnp.float32
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4, 6, 10)).astype(np.float32)
    assert_close(vae.encode(x), torch_encode(ref, x), 9e-6, "encode vs diffusers")  # measured 2.6e-7 (2026-12-07)
    z = np.random.default_rng(1).standard_normal((3, 3, 4, 3)).astype(np.float32)
    assert_close(vae.decode(z), torch_decode(ref, z), 9e-6, "decode vs diffusers")  # measured 8.8e-7


@pytest.mark.parametrize("stored,dtype", [("fp32", jnp.bfloat16), ("bf16", jnp.bfloat16), ("bf16", jnp.float32)])
def test_diffusers_folder_dtypes(ref, folders, stored, dtype):
    """fp32 → bf16 rounds like torch's `.to(bfloat16)`; bf16 files load exactly (also upcast to fp32)."""
    assert_params_equal(load_vae(folders / stored, dtype=dtype), to_bf16(ref), dtype)


def test_single_files_diffusers_and_original_names(ref, folders, tmp_path):
    state = numpy_state(ref)
    config = VAEConfig(**CFG)
    # a diffusers file on its own (config passed), and a Wan/ComfyUI file inside a bigger checkpoint
    vae = load_vae(folders / "fp32" / "diffusion_pytorch_model.safetensors", config=CFG, dtype=jnp.float32)
    assert_params_equal(vae, ref, jnp.float32)
    combined = {f"first_stage_model.{k}": v for k, v in original_names(state, config).items()}
    combined["model.diffusion_model.proj_out.weight"] = np.zeros((2, 2), np.float32)  # another model's tensor
    save_file(combined, tmp_path / "comfy.safetensors")
    vae = load_vae(tmp_path / "comfy.safetensors", config=config, dtype=jnp.float32)
    assert_params_equal(vae, ref, jnp.float32)
    # the time_conv tensors are optional (never used for images)
    save_file({k: v for k, v in original_names(state, config).items() if "time_conv" not in k},
              tmp_path / "no_time_conv.safetensors")
    assert_params_equal(load_vae(tmp_path / "no_time_conv.safetensors", config=config, dtype="fp32"), ref, jnp.float32)


def test_original_names_agree_with_diffusers_converter():
    """Our Wan-2.1 names, run through diffusers' own single-file converter, give the diffusers names
    of the released architecture (its converter hard-codes that layout)."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from qwen_edit_jax.weights.vae_keys import vae_keys

    keys = vae_keys(VAEConfig())
    converted = convert_wan_vae_to_diffusers({k.original: k.name for k in keys})
    assert converted == {k.name: k.name for k in keys}
    with torch.device("meta"):
        sd = AutoencoderKLQwenImage().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k.name: k.shape for k in keys}


# ---- errors -----------------------------------------------------------------------------------------------
def write_variant(tmp_path, ref, name: str, edit) -> Path:
    """A diffusers folder `name` holding the tiny model's tensors after `edit(state)`."""
    d = tmp_path / name
    d.mkdir()
    state = numpy_state(ref)
    edit(state)
    save_file(state, d / "diffusion_pytorch_model.safetensors")
    (d / "config.json").write_text(json.dumps(VAEConfig(**CFG).to_dict()))
    return d


def test_missing_extra_misshaped_tensors(ref, tmp_path):
    d = write_variant(tmp_path, ref, "missing", lambda s: s.pop("decoder.mid_block.attentions.0.proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing: missing tensor 'decoder\.mid_block\.attentions\.0\.proj\."):
        load_vae(d)
    d = write_variant(tmp_path, ref, "extra", lambda s: s.update({"encoder.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'encoder\.extra\.weight'"):
        load_vae(d)
    d = write_variant(tmp_path, ref, "shape", lambda s: s.update({"encoder.conv_in.bias": np.zeros(5, np.float32)}))
    with pytest.raises(CheckpointError, match=r"safetensors: tensor 'encoder\.conv_in\.bias' has shape \[5\], "
                                              r"expected \[8\]"):
        load_vae(d)
    # a single file has no config: the released architecture is assumed, and the error says so
    with pytest.raises(CheckpointError, match="pass config="):
        load_vae(d / "diffusion_pytorch_model.safetensors")
    save_file({"foo.weight": np.zeros(2, np.float32)}, tmp_path / "not_vae.safetensors")
    with pytest.raises(CheckpointError, match="no VAE tensors found"):
        load_vae(tmp_path / "not_vae.safetensors")


@pytest.mark.parametrize("edit,match", [
    ({"latent_channels": 16}, r"unknown config keys \['latent_channels'\]"),
    ({"latents_mean": [0.0] * 16}, "latents_mean has 16 values, z_dim is 3"),
    ({"_class_name": "AutoencoderKLWan"}, "expected 'AutoencoderKLQwenImage'"),
    ({"attn_scales": [1.0]}, "attn_scales"),
    ({"temperal_downsample": [True, True]}, "temperal_downsample has 2 entries"),
])
def test_bad_config(ref, folders, tmp_path, edit, match):
    d = tmp_path / "cfg"
    d.mkdir()
    os.symlink(folders / "fp32" / "diffusion_pytorch_model.safetensors", d / "diffusion_pytorch_model.safetensors")
    (d / "config.json").write_text(json.dumps({**VAEConfig(**CFG).to_dict(), **edit}))
    with pytest.raises(ValueError, match=r"config\.json: .*" + match):
        load_vae(d)


def test_config_file_problems(folders, tmp_path):
    d = tmp_path / "noconf"
    d.mkdir()
    os.symlink(folders / "fp32" / "diffusion_pytorch_model.safetensors", d / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_vae(d)


def test_input_shape_errors(folders):
    vae = load_vae(folders / "fp32", dtype=jnp.float32)  # spatial factor 2 for this tiny config
    with pytest.raises(ValueError, match=r"image size 6×7 .* not a multiple of 2.*multiples of 4.*use 8"):
        vae.encode(np.zeros((1, 4, 6, 7), np.float32))
    with pytest.raises(ValueError, match=r"images must be \[B, 4, H, W\]"):
        vae.encode(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="video layout.*drop axis 2"):
        vae.encode(np.zeros((1, 4, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"latents must be \[B, 3, h, w\]"):
        vae.decode(np.zeros((1, 16, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"100×64 .* multiple of 8.*DiT needs multiples of 16.*pipelines use 32"):
        check_image_shape((1, 3, 100, 64), VAEConfig())


def test_init_vae_and_lower():
    vae = init_vae(VAEConfig(**CFG), seed=1, dtype="bf16")
    assert vae.dtype == jnp.bfloat16
    assert vae.lower("decode", (2, 3, 4, 5)).compile().memory_analysis().temp_size_in_bytes > 0
    with pytest.raises(ValueError, match="not a multiple of 2"):  # AOT lowering checks sizes too
        vae.lower("encode", (1, 4, 6, 7))


# ---- 8 simulated devices ----------------------------------------------------------------------------------
SHARDED_JOB = Job("VAE on 8 devices", [sys.executable, str(WORKER)], timeout=900,
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
@pytest.mark.background(SHARDED_JOB)
def test_sharded_batches_on_8_devices():
    p = SHARDED_JOB.result()
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"worker printed no result (rc={p.returncode}):\n{p.stderr[-4000:]}"
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["ok"], r.get("error")
    for case in r["cases"]:
        where = f"mesh {case['mesh']}, batch {case['batch']}"
        assert_err(case["enc_err"], 2e-5, f"sharded encode vs diffusers, {where}")  # measured ≤ 5.1e-7 (2026-12-07)
        assert_err(case["dec_err"], 2e-5, f"sharded decode vs diffusers, {where}")  # measured ≤ 1.6e-6
        assert case["params_replicated"], case
        assert case["out_split"] == case["dec_split"] == case["expect_split"], case
