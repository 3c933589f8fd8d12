"""The merge command (convert/merge_lora.py → `convert.merge_loras`) against diffusers + PEFT.

A tiny repo folder (random diffusers DiT in `transformer/`, sharded; other components as small files)
and two random LoRA files (kohya keys with alpha; diffusers keys without, strength 0.5). The merged repo
is loaded by diffusers (`QwenImageTransformer2DModel.from_pretrained`) and must give what diffusers gives
with the base plus both LoRAs as PEFT adapters (`load_lora_adapter` + `set_adapters`), fp32.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import qwen_edit_jax as q
from qwen_edit_jax.convert import merge_loras
from qwen_edit_jax.errors import LoraError
from qwen_edit_jax.testing.repo import SCHEDULER_CONFIG, write_model_index
from tests.compare import assert_close
from tests.test_lora_io import random_lora, to_style
from tests.torch_reference import make_torch_model, save_torch_model, torch_forward

torch = pytest.importorskip("torch")

# ≈ 10× the error measured on 2026-12-07 (2-core CPU; tests/compare.py says how to re-measure)
TOL = 7e-6  # merged (diffusers-loaded) vs base + PEFT adapters: measured 6.6e-7
JAX_TOL = 7e-5  # the merged Orbax checkpoint in our DiT vs the same: measured 6.8e-6
TINY = q.preset("tiny")
SHAPES = [(1, 4, 4), (1, 2, 4)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((1, sum(f * h * w for f, h, w in SHAPES), TINY.in_channels), dtype=np.float32)
    enc = rng.standard_normal((1, 6, TINY.joint_attention_dim), dtype=np.float32)
    return hidden, enc, np.array([0.6], np.float32)


def _forward(tm):
    hidden, enc, sigma = _inputs()
    return torch_forward(tm, hidden, enc, None, sigma, [SHAPES])


def _forward_jax(model):
    hidden, enc, sigma = _inputs()
    return np.asarray(model(hidden_states=hidden, encoder_hidden_states=enc, timestep=sigma, img_shapes=[SHAPES]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    tm = make_torch_model(TINY, seed=5)
    repo = d / "repo"
    save_torch_model(tm, str(repo / "transformer"), sharded=True)
    (repo / "scheduler").mkdir()
    (repo / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    (repo / "vae").mkdir()
    (repo / "vae" / "config.json").write_text("{}")  # a stand-in: the test loads the transformer only
    write_model_index(repo, "edit_plus", transformer=True, scheduler=True)
    p1, p2 = str(d / "one.safetensors"), str(d / "two.safetensors")
    save_file(to_style(random_lora(TINY, 21, with_alpha=True), "kohya"), p1)
    save_file(to_style(random_lora(TINY, 22, with_alpha=False, skip=("mod",)), "diffusers"), p2)
    return tm, str(repo), p1, p2


def _cli():
    spec = importlib.util.spec_from_file_location("merge_lora", os.path.join(ROOT, "convert", "merge_lora.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_merged_repo_equals_diffusers_base_plus_loras(setup, tmp_path, capsys):
    """CLI → a whole repo (transformer/ merged, the rest hard-linked) that diffusers loads and that equals
    diffusers' base + both LoRAs (strengths 1 and 0.5)."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    tm, repo, p1, p2 = setup
    out = str(tmp_path / "merged")
    cli = _cli()
    assert cli.main(["--base", repo, "--lora", p1, "--lora", f"{p2}:0.5", "--output", out, "--no-progress"]) == 0
    assert os.path.samefile(os.path.join(out, "vae", "config.json"), os.path.join(repo, "vae", "config.json"))
    assert sorted(os.listdir(out)) == sorted(os.listdir(repo))
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))  # no temporary left behind
    merged = QwenImageTransformer2DModel.from_pretrained(os.path.join(out, "transformer"), torch_dtype=torch.float32)

    ref = copy.deepcopy(tm)
    ref.load_lora_adapter(QwenImageLoraLoaderMixin.lora_state_dict(p1), prefix="transformer", adapter_name="one")
    ref.load_lora_adapter(QwenImageLoraLoaderMixin.lora_state_dict(p2), prefix="transformer", adapter_name="two")
    ref.set_adapters(["one", "two"], weights=[1.0, 0.5])
    expected = _forward(ref)
    assert_close(_forward(merged), expected, TOL, "merged repo (diffusers) vs base + LoRAs (PEFT)")
    assert np.abs(_forward(tm) - expected).max() > 1e-2 * np.abs(expected).max()  # the LoRAs matter

    # an existing output is refused, and left alone
    capsys.readouterr()
    assert cli.main(["--base", repo, "--lora", p1, "--output", out, "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err

    # the other formats from the same merge: one ComfyUI file with the same tensors; a merged checkpoint
    single = str(tmp_path / "merged.safetensors")
    merge_loras(repo, [p1, (p2, 0.5)], single, format="comfyui", progress=False)
    folder = os.path.join(out, "transformer")
    shards = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    with safe_open(single, "np") as f:
        names = sorted(f.keys())
        in_shards = []
        for shard in shards:
            with safe_open(shard, "np") as g:
                in_shards += list(g.keys())
                for name in g.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    np.testing.assert_array_equal(f.get_tensor(name), g.get_tensor(name))
        assert names == sorted(in_shards)
    ckpt = str(tmp_path / "merged_orbax")
    merge_loras(repo, [p1, (p2, 0.5)], ckpt, format="merged", progress=False)
    assert_close(_forward_jax(q.load_transformer(ckpt)), expected, JAX_TOL, "merged Orbax checkpoint vs base + LoRAs")
    quantized = str(tmp_path / "merged_int8")
    merge_loras(repo, [p1, (p2, 0.5)], quantized, format="merged", quantize="int8", progress=False)
    with open(os.path.join(quantized, "qwen_edit_jax.json")) as f:
        assert json.load(f)["quantize"] == "int8"


def test_merge_errors_name_the_file_and_module(setup, tmp_path):
    """Every adapter module must match a base weight; bad options are refused before anything is written."""
    _, repo, p1, _ = setup
    d = TINY.inner_dim
    out = str(tmp_path / "out")
    beyond = str(tmp_path / "beyond.safetensors")
    save_file({f"transformer.transformer_blocks.{TINY.num_layers}.attn.to_q.lora_A.weight": np.ones((2, d), np.float32),
               f"transformer.transformer_blocks.{TINY.num_layers}.attn.to_q.lora_B.weight": np.ones((d, 2), np.float32)},
              beyond)
    with pytest.raises(LoraError, match=rf"beyond.safetensors: LoRA module transformer_blocks.{TINY.num_layers}"
                                        r".attn.to_q is beyond the base model's"):
        merge_loras(repo, [p1, beyond], out, progress=False)
    wrong = str(tmp_path / "wrong.safetensors")
    save_file({"transformer.proj_out.lora_A.weight": np.ones((2, d + 8), np.float32),
               "transformer.proj_out.lora_B.weight": np.ones((TINY.out_features, 2), np.float32)}, wrong)
    with pytest.raises(LoraError, match=r"wrong.safetensors: lora adapter for proj_out is \d+ → \d+; the base weight is"):
        merge_loras(repo, [wrong], out, progress=False)
    with pytest.raises(ValueError, match="--quantize int8 needs --format merged"):
        merge_loras(repo, [p1], out, quantize="int8", progress=False)
    with pytest.raises(ValueError, match="overlaps the base"):
        merge_loras(repo, [p1], os.path.join(repo, "out"), progress=False)
    assert not os.path.exists(out)


def test_merge_bakes_dora_and_lokr_files(setup, tmp_path):
    """A DoRA file (PEFT keys) then a LoKr file (LyCORIS keys) merged in order: each touched weight equals
    PEFT's DoRA rule m·(W + s·B·A)/‖W + s·B·A‖ (rows) followed by LyCORIS's W + s·kron(w1, w2_a·w2_b),
    written here in numpy from their definitions; untouched weights are copied bit for bit."""
    tm, repo, _, _ = setup
    rng = np.random.default_rng(3)
    d, r = TINY.inner_dim, 4
    base = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    dora_mod, lokr_mod = "transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"
    a, b = rng.standard_normal((r, d)).astype(np.float32), rng.standard_normal((d, r)).astype(np.float32) * 0.1
    m = rng.uniform(0.5, 1.5, d).astype(np.float32)
    dora = str(tmp_path / "dora.safetensors")
    save_file({f"transformer.{dora_mod}.lora_A.weight": a, f"transformer.{dora_mod}.lora_B.weight": b,
               f"transformer.{dora_mod}.lora_magnitude_vector": m}, dora)
    out_f, in_f = base[f"{lokr_mod}.weight"].shape
    w1 = rng.standard_normal((4, 4)).astype(np.float32)
    w2a = rng.standard_normal((out_f // 4, 2)).astype(np.float32) * 0.1
    w2b = rng.standard_normal((2, in_f // 4)).astype(np.float32)
    flat = "lycoris_" + lokr_mod.replace(".", "_")
    lokr = str(tmp_path / "lokr.safetensors")
    save_file({f"{flat}.lokr_w1": w1, f"{flat}.lokr_w2_a": w2a, f"{flat}.lokr_w2_b": w2b,
               f"{flat}.alpha": np.asarray(1.0, np.float32)}, lokr)
    single = str(tmp_path / "merged.safetensors")
    merge_loras(repo, [(dora, 0.5), lokr], single, format="comfyui", progress=False)

    w = base[f"{dora_mod}.weight"].astype(np.float64)
    v = w + 0.5 * (b.astype(np.float64) @ a)
    dora_ref = m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
    lokr_ref = base[f"{lokr_mod}.weight"] + 0.5 * np.kron(w1, w2a @ w2b)  # alpha 1 / rank 2
    with safe_open(single, "np") as f:
        got = {k.removeprefix("model.diffusion_model."): k for k in f.keys()}  # noqa: SIM118
        assert_close(f.get_tensor(got[f"{dora_mod}.weight"]), dora_ref, 1.5e-6, "DoRA merged")  # measured 1.3e-7
        assert_close(f.get_tensor(got[f"{lokr_mod}.weight"]), lokr_ref, 1e-6, "LoKr merged")  # measured 0 (fp32 sum)
        untouched = f"{dora_mod.replace('to_q', 'to_k')}.weight"
        np.testing.assert_array_equal(f.get_tensor(got[untouched]), base[untouched])
