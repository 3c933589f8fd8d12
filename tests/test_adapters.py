"""DoRA, LoKr and per-module adapter plans (`lora.type`, `lora.include` / `exclude` / `rank_pattern` /
`alpha_pattern`) against their references: diffusers + PEFT (DoRA, patterns) and LyCORIS (LoKr).

One tiny diffusers model (2 blocks) is the base of every test; adapters get random non-zero values (trained-like)
so that a wrong scale, norm or slice shows.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import qwen_edit_jax as q
from qwen_edit_jax.errors import LoraError
from qwen_edit_jax.lora import (
    apply_lora,
    load_lora_into_adapters,
    read_lora_file,
    resolve_lora_config,
    save_lora,
)
from qwen_edit_jax.models.dit import lokr_factorization
from tests.compare import assert_close, assert_differs
from tests.torch_reference import make_torch_model, save_torch_model, torch_forward

TINY = q.preset("tiny")
SHAPES = [(1, 4, 4), (1, 2, 4)]
ALL_TARGETS = ("to_qkv", "add_qkv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp", "img_mod", "txt_mod")


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    n = sum(f * h * w for f, h, w in SHAPES)
    hidden = rng.standard_normal((1, n, TINY.in_channels), dtype=np.float32)
    enc = rng.standard_normal((1, 6, TINY.joint_attention_dim), dtype=np.float32)
    sigma = rng.uniform(0.1, 0.9, size=(1,)).astype(np.float32)
    return hidden, enc, sigma


def _ours(model):
    hidden, enc, sigma = _inputs()
    return np.asarray(model(hidden_states=jnp.asarray(hidden), encoder_hidden_states=jnp.asarray(enc),
                            timestep=jnp.asarray(sigma), img_shapes=[SHAPES]))


def _ref(tm):
    hidden, enc, sigma = _inputs()
    return torch_forward(tm, hidden, enc, None, sigma, [SHAPES])


def _diffusers_with(tm, path):
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    sd, meta = QwenImageLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    tm = copy.deepcopy(tm)
    tm.load_lora_adapter(sd, prefix="transformer", adapter_name="a", metadata=meta)
    return tm


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tm = make_torch_model(TINY, seed=5)
    path = save_torch_model(tm, tmp_path_factory.mktemp("base"))
    flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(q.load_transformer(path), nnx.Param))}
    return tm, path, flat


def _trained(base, lora: q.LoraConfig, seed: int):
    """A model on the base with `lora` adapters set to random non-zero values (B, w2 ≠ 0; m ≠ ‖W‖)."""
    _, _, flat = base
    model = q.model_from_params(TINY, q.ModelOptions(lora=lora), flat, lora_seed=seed)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        v = np.asarray(var[...])
        if path[-1] in ("lora_B", "lokr_w2", "lokr_w2_b"):
            v = 0.3 * rng.standard_normal(v.shape) / np.sqrt(v.shape[-2])
        elif path[-1] == "lora_magnitude":
            v = v * rng.uniform(0.7, 1.3, v.shape)
        var.set_value(jnp.asarray(v, jnp.float32))
    return model


# ---- DoRA -------------------------------------------------------------------------------------------
def test_dora_export_loads_in_diffusers(base, tmp_path):
    tm, base_path, flat = base
    lora = q.LoraConfig(rank=3, alpha=6.0, targets=ALL_TARGETS, type="dora")
    fresh = q.model_from_params(TINY, q.ModelOptions(lora=lora), flat)
    assert_close(_ours(fresh), _ref(tm), 2e-5, "fresh DoRA = base")  # m = ‖W‖ at init; measured 1.1e-6
    model = _trained(base, lora, seed=1)
    ours = _ours(model)
    assert_differs(ours, _ref(tm), 1e-2, "DoRA vs base")
    path = save_lora(model, tmp_path / "dora.safetensors")
    parsed = read_lora_file(path)
    assert parsed.kind == "dora" and parsed.style == "diffusers"
    ref = _ref(_diffusers_with(tm, path))
    assert_close(ours, ref, 1e-5, "DoRA export in diffusers")  # measured 1.0e-6
    # merged by our loader (the records' `merged`) and resumed into adapters
    assert_close(_ours(q.load_transformer(base_path, lora=path)), ref, 1e-5, "DoRA merged")  # measured 1.0e-6
    dst = _trained(base, lora, seed=7)
    load_lora_into_adapters(dst, path)
    assert_close(_ours(dst), ours, 1e-6, "DoRA resume")  # measured 0
    w = parsed.modules["transformer_blocks.1.attn.to_k"]
    weight = np.asarray(tm.transformer_blocks[1].attn.to_k.weight.detach())
    peft_layer = _diffusers_with(tm, path).transformer_blocks[1].attn.to_k
    peft_layer.set_scale("a", 0.5)  # what set_adapters(weights=0.5) does to one layer
    x = torch.randn(4, weight.shape[1])
    with torch.no_grad():
        ref_half = peft_layer(x).numpy() - peft_layer.base_layer.bias.numpy()
    assert_close(x.numpy() @ w.merged(weight, 0.5).T, ref_half, 1e-5, "DoRA strength")  # measured 2e-7
