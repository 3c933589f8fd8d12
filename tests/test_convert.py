"""Converter: every input layout, bit-exact round trips (dtype included), LoRA conversion, CLI."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import qwen_edit_jax as q
from qwen_edit_jax.lora import read_lora, read_lora_file
from qwen_edit_jax.weights import checkpoint, keymap
from qwen_edit_jax.convert import convert
from qwen_edit_jax.weights.safetensors_io import TensorSource
from tests.compare import assert_close
from tests.torch_reference import make_torch_model, save_torch_model, torch_forward

TINY = q.preset("tiny")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tensors_of(path: str) -> dict[str, np.ndarray]:
    src = TensorSource.open(path)
    return {k: src.get(k) for k in src.keys()}


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    assert sorted(a) == sorted(b)
    for k, x in a.items():
        assert x.dtype == b[k].dtype, (k, x.dtype, b[k].dtype)
        assert x.shape == b[k].shape, k
        assert x.tobytes() == b[k].tobytes(), k


def flax_params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def torch_model():
    return make_torch_model(TINY, seed=4)


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory, torch_model):
    import torch

    return save_torch_model(torch_model, tmp_path_factory.mktemp("bf16") / "base", sharded=True, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def fp32_single(tmp_path_factory, torch_model):
    return save_torch_model(torch_model, tmp_path_factory.mktemp("fp32") / "base")


# Names of the Flax tree that differ from diffusers' module names (written out here, independently of
# qwen_edit_jax.weights.keymap, so that the loader is checked against something it did not produce).
_RENAMES = (("img_mod.1.", "img_mod."), ("txt_mod.1.", "txt_mod."), ("img_mlp.net.0.proj.", "img_mlp.fc1."),
            ("img_mlp.net.2.", "img_mlp.fc2."), ("txt_mlp.net.0.proj.", "txt_mlp.fc1."),
            ("txt_mlp.net.2.", "txt_mlp.fc2."), ("attn.to_out.0.", "attn.to_out."))
_FUSED = {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "attn.add_qkv_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def reference_from_torch(torch_model) -> dict[str, np.ndarray]:
    """The expected Flax params of a diffusers model, from its `state_dict()` by hand: linear weights
    [out, in] → kernels [in, out]; norm weights → `scale`; blocks stacked on a leading axis; q|k|v
    fused into kernels [D, 3, D] (slice j = q, k, v) and biases [3, D]."""
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}

    def leaf(name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
        stem, kind = name.rsplit(".", 1)
        if kind == "bias":
            return name, w
        if "norm" in stem and w.ndim == 1:
            return f"{stem}.scale", w
        return f"{stem}.kernel", w.T

    out: dict[str, np.ndarray] = {}
    blocks: dict[str, list[np.ndarray]] = {}
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(n):
        pre = f"transformer_blocks.{i}."
        mine = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        for fused, parts in _FUSED.items():
            blocks.setdefault(f"{fused}.kernel", []).append(
                np.stack([mine.pop(f"{p}.weight").T for p in parts], axis=1))  # [D_in, 3, D_out]
            blocks.setdefault(f"{fused}.bias", []).append(np.stack([mine.pop(f"{p}.bias") for p in parts]))
        for k, v in mine.items():
            for a, b in _RENAMES:
                k = k.replace(a, b)
            name, v = leaf(k, v)
            blocks.setdefault(name, []).append(v)
    for name, vs in blocks.items():
        out[f"transformer_blocks.{name}"] = np.stack(vs)
    for k, v in sd.items():
        if not k.startswith("transformer_blocks."):
            name, v = leaf(k, v)
            out[name] = v
    return out


@pytest.fixture(scope="module")
def reference_params():
    # a fresh copy of `torch_model` (same seed): the bf16 fixture's `.to(bfloat16)` round trip rounds that one
    return reference_from_torch(make_torch_model(TINY, seed=4))


def test_reference_is_independent_and_complete(reference_params):
    """The hand-built reference has the model's exact tree, and the fused kernel's slice j is W_j.T."""
    model = q.init_transformer(TINY)
    shapes = {k: v.shape for k, v in flax_params(model).items()}
    assert {k: v.shape for k, v in reference_params.items()} == shapes
    sd = make_torch_model(TINY, seed=4).state_dict()
    qkv = reference_params["transformer_blocks.attn.to_qkv.kernel"]
    np.testing.assert_array_equal(qkv[1, :, 2, :], sd["transformer_blocks.1.attn.to_v.weight"].numpy().T)
    np.testing.assert_array_equal(reference_params["transformer_blocks.attn.add_qkv_proj.bias"][0, 1],
                                  sd["transformer_blocks.0.attn.add_k_proj.bias"].numpy())


# ---- round trips ---------------------------------------------------------------------------------
def test_roundtrip_bf16_bit_exact(bf16_sharded, tmp_path):
    merged, std = str(tmp_path / "merged"), str(tmp_path / "std")
    res = convert(bf16_sharded, merged, "to_merged", progress=False)
    assert "diffusers folder" in res.detected.container and "+ index" in res.detected.container
    with open(os.path.join(merged, checkpoint.MARKER)) as f:
        marker = json.load(f)
    assert set(marker["dtypes"].values()) == {"bfloat16"}  # bf16 stays bf16
    convert(merged, std, "to_standard", progress=False, max_shard_size="100KB")
    assert os.path.exists(os.path.join(std, "diffusion_pytorch_model.safetensors.index.json"))
    assert_bit_identical(tensors_of(bf16_sharded), tensors_of(std))
    assert q.DiTConfig.from_json(std) == q.DiTConfig.from_json(bf16_sharded)


def test_roundtrip_bit_exact_with_every_buffer_reused(bf16_sharded, tmp_path, monkeypatch):
    """The converter reuses scratch buffers (reads, transposes, the writer thread) and drops written pages
    from the page cache: with every array pooled and a drop after every tensor, both directions and the
    ComfyUI single file still give back every tensor bit for bit."""
    from qwen_edit_jax.weights import buffers, writer

    monkeypatch.setattr(buffers, "POOL_MIN_BYTES", 0)  # tiny tensors are pooled too
    monkeypatch.setattr(writer.SafetensorsWriter, "DROP_EVERY", 1)
    taken = []
    real_take = buffers.ScratchBuffers.take
    monkeypatch.setattr(buffers.ScratchBuffers, "take", lambda self, *a, **k: taken.append(1) or real_take(self, *a, **k))
    merged, std, comfy = str(tmp_path / "merged"), str(tmp_path / "std"), str(tmp_path / "comfy.safetensors")
    convert(bf16_sharded, merged, "to_merged", progress=False, max_shard_size="100KB")
    convert(merged, std, "to_standard", progress=False, max_shard_size="100KB")
    convert(merged, comfy, "to_standard", format="comfyui", progress=False)
    assert len(taken) > 100
    src = tensors_of(bf16_sharded)
    assert_bit_identical(src, tensors_of(std))
    assert_bit_identical(src, tensors_of(comfy))


def test_roundtrip_mixed_dtypes_and_cast(tmp_path, torch_model):
    """fp32 norms inside a bf16 checkpoint keep their dtype; --dtype casts everything."""
    src = tensors_of(save_torch_model(torch_model, tmp_path / "fp32"))
    mixed = {k: (v if "norm" in k else v.astype(jnp.bfloat16)) for k, v in src.items()}
    os.makedirs(tmp_path / "mixed")
    save_file(mixed, str(tmp_path / "mixed" / "diffusion_pytorch_model.safetensors"))
    TINY.to_json(tmp_path / "mixed" / "config.json")
    convert(tmp_path / "mixed", tmp_path / "m", "to_merged", progress=False)
    convert(tmp_path / "m", tmp_path / "s", "to_standard", progress=False)
    assert_bit_identical(mixed, tensors_of(str(tmp_path / "s")))
    convert(tmp_path / "m", tmp_path / "m32", "to_merged", dtype="fp32", progress=False)
    restored = checkpoint.MergedParams(tmp_path / "m32")
    assert {restored.dtype(p).name for p in restored.paths()} == {"float32"}
    convert(tmp_path / "m32", tmp_path / "s32", "to_standard", progress=False)
    back = tensors_of(str(tmp_path / "s32"))
    assert all(back[k].dtype == np.float32 and np.array_equal(back[k], mixed[k].astype(np.float32)) for k in mixed)


def test_merged_checkpoint_loads_and_matches_diffusers(fp32_single, torch_model, tmp_path):
    merged = str(tmp_path / "merged")
    convert(fp32_single, merged, "to_merged", progress=False)
    model = q.load_transformer(merged)
    rng = np.random.default_rng(0)
    shapes = [(1, 4, 4), (1, 2, 4)]
    hidden = rng.standard_normal((1, 24, 64), dtype=np.float32)
    enc = rng.standard_normal((1, 5, TINY.joint_attention_dim), dtype=np.float32)
    sigma = np.array([0.4], np.float32)
    ref = torch_forward(torch_model, hidden, enc, None, sigma, [shapes])
    ours = model(hidden_states=hidden, encoder_hidden_states=enc, timestep=sigma, img_shapes=[shapes])
    assert_close(ours, ref, 6e-6, "merged checkpoint vs diffusers")  # measured 5.5e-7 (2026-12-07), ≈ 10×


def test_load_merged_params_partial_and_cast(fp32_single, tmp_path):
    """The sharding helper's entry point: abstract state in, arrays out (dtype of the abstract state)."""
    import jax

    merged = str(tmp_path / "merged")
    convert(fp32_single, merged, "to_merged", progress=False)
    abs_state = nnx.state(q.abstract_model(TINY, q.ModelOptions(param_dtype=jnp.bfloat16)), nnx.Param)
    state = checkpoint.load_merged_params(merged, abs_state)
    kernel = state["transformer_blocks"]["attn"]["to_qkv"]["kernel"][...]
    assert kernel.dtype == jnp.bfloat16 and kernel.shape == (2, 128, 3, 128)
    flat = {"img_in.kernel": jax.ShapeDtypeStruct((64, 128), jnp.float32)}
    part = checkpoint.load_merged_params(merged, flat)
    assert list(part) == ["img_in.kernel"]
    np.testing.assert_array_equal(np.asarray(part["img_in.kernel"]), checkpoint.MergedParams(merged).read("img_in.kernel"))


# ---- every input layout ---------------------------------------------------------------------------
def _write_single(path, tensors, prefix=""):
    save_file({prefix + k: v for k, v in tensors.items()}, str(path))
    return str(path)


def _fused_original(tensors):
    """The original merged-QKV PyTorch layout: to_qkv / add_qkv_proj [3D, D] in torch layout."""
    out = dict(tensors)
    for i in range(TINY.num_layers):
        for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("add_qkv_proj", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for leaf in ("weight", "bias"):
                names = [f"transformer_blocks.{i}.attn.{p}.{leaf}" for p in parts]
                out[f"transformer_blocks.{i}.attn.{fused}.{leaf}"] = np.concatenate([out.pop(n) for n in names], 0)
    return out


@pytest.mark.parametrize("layout", ["folder_single", "folder_sharded", "index_json", "file_with_config",
                                    "comfyui_model_prefix", "comfyui_prefix", "transformer_prefix",
                                    "original_merged_qkv", "merged_orbax"])
def test_every_layout_loads_identically(layout, tmp_path, torch_model, fp32_single, reference_params):
    base = tensors_of(fp32_single)
    cfg_json = os.path.join(fp32_single, "config.json")
    config = None
    if layout == "folder_single":
        path = fp32_single
    elif layout == "folder_sharded":
        path = save_torch_model(torch_model, tmp_path / "sharded", sharded=True)
    elif layout == "index_json":
        path = os.path.join(save_torch_model(torch_model, tmp_path / "sharded", sharded=True),
                            "diffusion_pytorch_model.safetensors.index.json")
    elif layout == "file_with_config":
        path, config = _write_single(tmp_path / "x.safetensors", base), cfg_json
    elif layout == "comfyui_model_prefix":
        path, config = _write_single(tmp_path / "c.safetensors", base, "model.diffusion_model."), cfg_json
    elif layout == "comfyui_prefix":
        path, config = _write_single(tmp_path / "c.safetensors", base, "diffusion_model."), "tiny"
    elif layout == "transformer_prefix":
        path, config = _write_single(tmp_path / "t.safetensors", base, "transformer."), cfg_json
    elif layout == "original_merged_qkv":
        path, config = _write_single(tmp_path / "o.safetensors", _fused_original(base)), cfg_json
    else:
        path = str(tmp_path / "merged")
        convert(fp32_single, path, "to_merged", progress=False)
    cfg = None if config is None else (q.preset(config) if config == "tiny" else q.DiTConfig.from_json(config))
    params = flax_params(q.load_transformer(path, config=cfg))
    assert params.keys() == reference_params.keys()
    for k in params:
        np.testing.assert_array_equal(params[k], reference_params[k], err_msg=k)
    # and to_standard from this layout gives back the diffusers tensors exactly
    out = tmp_path / "std"
    res = convert(path, out, "to_standard", config=config, progress=False)
    assert res.detected.kind == "base"
    assert_bit_identical(tensors_of(str(out)), base)


def test_detection_messages(tmp_path, fp32_single):
    from qwen_edit_jax.convert import detect

    base = tensors_of(fp32_single)
    assert "ComfyUI" in detect(_write_single(tmp_path / "c.safetensors", base, "model.diffusion_model.")).key_style
    assert "original merged-QKV" in detect(_write_single(tmp_path / "o.safetensors", _fused_original(base))).key_style
    assert "diffusers/DiffSynth" in detect(fp32_single).key_style
    lora = _write_single(tmp_path / "l.safetensors", {
        "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": np.ones((2, 128), np.float32),
        "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": np.ones((128, 2), np.float32),
        "lora_unet_transformer_blocks_0_attn_to_q.alpha": np.asarray(1.0, np.float32)})
    det = detect(lora)
    assert det.kind == "LoRA" and "kohya" in det.key_style and "with alpha" in det.key_style


def test_comfyui_single_file_output(fp32_single, tmp_path, reference_params):
    out = str(tmp_path / "comfy.safetensors")
    convert(fp32_single, out, "to_standard", format="comfyui", progress=False)
    assert os.path.isfile(out)
    assert_bit_identical(tensors_of(out), tensors_of(fp32_single))
    params = flax_params(q.load_transformer(out, config=TINY))
    assert all(np.array_equal(params[k], reference_params[k]) for k in params)


# ---- LoRA conversion ------------------------------------------------------------------------------
def _lora_sd(style: str, seed=0, rank=2):
    rng = np.random.default_rng(seed)
    d = TINY.inner_dim
    sd = {}
    for i in range(TINY.num_layers):
        for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                  "attn.to_out.0", "img_mlp.net.2"):
            name = f"transformer_blocks.{i}.{m}"
            din = 4 * d if "net.2" in m else d
            a = rng.standard_normal((rank, din)).astype(np.float32)
            b = rng.standard_normal((d, rank)).astype(np.float32)
            if style == "diffsynth":
                sd[f"{name}.lora_A.default.weight"], sd[f"{name}.lora_B.default.weight"] = a, b
            elif style == "kohya":
                flat = "lora_unet_" + name.replace(".", "_")
                sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = a, b
                sd[f"{flat}.alpha"] = np.asarray(rank * 1.5, np.float32)
    return sd


@pytest.mark.parametrize("style", ["diffsynth", "kohya"])
def test_lora_roundtrip_bit_exact(style, tmp_path, fp32_single):
    src = _write_single(tmp_path / "in.safetensors", _lora_sd(style))
    merged, back = str(tmp_path / "merged.safetensors"), str(tmp_path / "back.safetensors")
    res = convert(src, merged, "to_merged")
    assert res.detected.kind == "LoRA"
    lf = read_lora_file(merged)
    assert len(lf.fused_modules) == 2 * TINY.num_layers  # to_qkv and add_qkv_proj per block
    with safe_open(merged, "np") as f:
        a = f.get_tensor(next(k for k in f.keys() if "to_qkv" in k and ("lora_A" in k or "lora_down" in k)))
    assert a.shape == (6, TINY.inner_dim)  # rank 3r: stacked A
    convert(merged, back, "to_standard", format=style)
    assert_bit_identical(tensors_of(src), tensors_of(back))
    # the merged-layout LoRA applies exactly like the standard one
    m1 = flax_params(q.load_transformer(fp32_single, lora=src))
    m2 = flax_params(q.load_transformer(fp32_single, lora=merged))
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=0, atol=1e-6, err_msg=k)


def test_lora_files_are_recognised_by_content_not_name(tmp_path):
    """`to_merged` into a name without an extension, then `to_standard` from it: read back by content."""
    src = _write_single(tmp_path / "in.safetensors", _lora_sd("diffsynth", seed=2))
    merged, back = str(tmp_path / "l_merged"), str(tmp_path / "l_back")
    assert convert(src, merged, "to_merged").detected.kind == "LoRA"
    res = convert(merged, back, "to_standard", format="diffsynth")
    assert res.detected.kind == "LoRA" and "fused QKV modules" in res.detected.key_style
    assert_bit_identical(tensors_of(src), tensors_of(back))


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya", "diffsynth", "lightx2v"])
def test_lora_to_merged_honours_format(fmt, tmp_path):
    """`--direction to_merged --format F` writes the fused LoRA in key style F (it used to keep the input's)."""
    src = _write_single(tmp_path / "in.safetensors", _lora_sd("diffsynth", seed=3))
    merged = str(tmp_path / "merged.safetensors")
    res = convert(src, merged, "to_merged", format=fmt)
    assert f"({fmt} key style, fused" in res.written
    lf = read_lora_file(merged)
    assert lf.style == fmt and len(lf.fused_modules) == 2 * TINY.num_layers
    with safe_open(merged, "np") as f:
        keys = list(f.keys())
    marker = {"diffusers": "transformer.transformer_blocks.0.attn.to_qkv.lora_A.weight",
              "comfyui": "diffusion_model.transformer_blocks.0.attn.to_qkv.lora_A.weight",
              "kohya": "lora_unet_transformer_blocks_0_attn_to_qkv.lora_down.weight",
              "diffsynth": "transformer_blocks.0.attn.to_qkv.lora_A.default.weight",
              "lightx2v": "transformer_blocks.0.attn.to_qkv.lora_down.weight"}[fmt]
    assert marker in keys, keys[:4]
    back = str(tmp_path / "back.safetensors")
    convert(merged, back, "to_standard", format="diffsynth")
    a, b = read_lora(src), read_lora(back)
    assert sorted(a) == sorted(b)
    for m in a:  # the same ΔW per module, whatever style the merged file used
        np.testing.assert_allclose(b[m].delta(), a[m].delta(), rtol=1e-6, atol=1e-6)


def test_lora_to_standard_changes_style(tmp_path):
    src = _write_single(tmp_path / "in.safetensors", _lora_sd("kohya", seed=1))
    for fmt, marker in (("diffusers", "transformer."), ("comfyui", "diffusion_model."), ("diffsynth", ".default.")):
        out = str(tmp_path / f"{fmt}.safetensors")
        convert(src, out, "to_standard", format=fmt)
        with safe_open(out, "np") as f:
            assert all(marker in k for k in f.keys())
        a, b = read_lora(src), read_lora(out)
        for m in a:  # alpha 1.5·rank baked into B: same ΔW
            np.testing.assert_allclose(b[m].delta(), a[m].delta(), rtol=1e-6, atol=1e-6)


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_reports_detection_and_writes(bf16_sharded, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cc", os.path.join(ROOT, "convert", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / "m")
    assert cli.main(["--input", bf16_sharded, "--output", out, "--direction", "to_merged", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "detected: base model, diffusers folder" in text and "wrote merged Orbax checkpoint" in text
    assert checkpoint.is_merged_checkpoint(out)
    assert cli.main(["--input", bf16_sharded, "--output", out, "--direction", "to_merged", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "--overwrite" in err
    assert cli.main(["--input", bf16_sharded, "--output", out, "--direction", "to_merged", "--no-progress",
                     "--overwrite", "--dtype", "fp32"]) == 0
    assert checkpoint.MergedParams(out).dtype("img_in.kernel") == np.float32


def test_save_transformer_writes_what_diffusers_reads(tmp_path, fp32_single):
    """`save_transformer(model)` (used by the training demo) writes what diffusers itself would."""
    model = q.load_transformer(fp32_single)
    out = q.save_transformer(model, tmp_path / "out", max_shard_size="150KB")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    assert_bit_identical(tensors_of(out), tensors_of(fp32_single))
    bf = q.load_transformer(fp32_single, dtype=jnp.bfloat16)
    single = q.save_transformer(bf, tmp_path / "bf")
    assert os.listdir(single) and "diffusion_pytorch_model.safetensors" in os.listdir(single)
    assert {v.dtype.name for v in tensors_of(single).values()} == {"bfloat16"}
    assert dataclasses.asdict(q.DiTConfig.from_json(single)) == dataclasses.asdict(TINY)
    from diffusers import QwenImageTransformer2DModel

    tm = QwenImageTransformer2DModel.from_pretrained(out)
    ref = tensors_of(fp32_single)
    for k, v in tm.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), ref[k])
    assert keymap.torch_shapes(TINY).keys() == ref.keys()
