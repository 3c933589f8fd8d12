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
from qwen_edit_jax.lora import (
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
    state = nnx.state(q.load_transformer(path), nnx.Param)
    flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(state)}
    return tm, path, flat


def _trained(model, seed: int):
    """`model` (in place) with its adapters set to random non-zero values (B, w2 ≠ 0; m ≠ ‖W‖)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        v = np.asarray(var[...])
        if path[-1] in ("lora_B", "lokr_w2", "lokr_w2_b"):
            v = 0.3 * rng.standard_normal(v.shape) / np.sqrt(v.shape[-2])
        elif path[-1] == "lora_magnitude":
            v = v * rng.uniform(0.7, 1.3, v.shape)
        var.set_value(jnp.asarray(v, jnp.float32))
    return model


def _same_tensors(model, path, fmt):
    """Re-exporting `model` gives exactly the file at `path` (a resume round trip, compared without a forward)."""
    from safetensors.numpy import load_file

    again = save_lora(model, str(path) + ".again", format=fmt)
    a, b = load_file(path), load_file(again)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=0, err_msg=k)


# ---- DoRA -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dora_export_loads_in_diffusers(base, tmp_path):
    tm, base_path, flat = base
    lora = q.LoraConfig(rank=3, alpha=6.0, targets=ALL_TARGETS, type="dora")
    model = q.model_from_params(TINY, q.ModelOptions(lora=lora), flat)  # the loading path: m = ‖W‖ per output
    w_q = tm.transformer_blocks[1].attn.to_q.weight.detach().numpy()
    m_q = np.asarray(model.transformer_blocks.attn.to_qkv.lora_magnitude[...])[1, 0]
    assert_close(m_q, np.linalg.norm(w_q, axis=1), 1e-6, "DoRA magnitude init")  # measured 1e-7
    model = _trained(model, seed=1)
    ours = _ours(model)
    assert_differs(ours, _ref(tm), 1e-2, "DoRA vs base")  # measured 0.17
    path = save_lora(model, tmp_path / "dora.safetensors")
    parsed = read_lora_file(path)
    assert parsed.kind == "dora" and parsed.style == "diffusers"
    peft_tm = _diffusers_with(tm, path)
    ref = _ref(peft_tm)
    assert_close(ours, ref, 5e-6, "DoRA export in diffusers")  # measured 3.8e-7
    # merged by our loader (the records' `merged`) and resumed into adapters
    assert_close(_ours(q.load_transformer(base_path, lora=path)), ref, 5e-6, "DoRA merged")  # measured 5.0e-7
    load_lora_into_adapters(_trained(model, seed=7), path)
    _same_tensors(model, path, "diffusers")
    _dora_grads_match_peft(model, peft_tm, ours.shape, scale=2.0)
    # strength: what diffusers' set_adapters(weights=0.5) does to one PEFT layer
    w = parsed.modules["transformer_blocks.1.attn.to_k"]
    weight = tm.transformer_blocks[1].attn.to_k.weight.detach().numpy()
    peft_layer = peft_tm.transformer_blocks[1].attn.to_k
    peft_layer.set_scale("a", 0.5)
    x = torch.randn(4, weight.shape[1])
    with torch.no_grad():
        ref_half = peft_layer(x).numpy() - peft_layer.base_layer.bias.numpy()
    assert_close(x.numpy() @ w.merged(weight, 0.5).T, ref_half, 5e-6, "DoRA strength")  # measured 2.6e-7


def _dora_grads_match_peft(model, peft_tm, out_shape, scale: float):
    """Gradients of ⟨output, R⟩ w.r.t. A, B and m equal PEFT's (its norm detached as ours); B is exported as
    scale·Bᵀ, so ∂/∂B_ours = scale·(∂/∂B_file)ᵀ."""
    import jax

    hidden, enc, sigma = _inputs()
    r = np.random.default_rng(11).standard_normal(out_shape).astype(np.float32)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(hidden_states=jnp.asarray(hidden), encoder_hidden_states=jnp.asarray(enc),
                                           timestep=jnp.asarray(sigma), img_shapes=[SHAPES])
        return jnp.sum(out * r)

    grads = nnx.to_pure_dict(jax.grad(loss)(params))
    peft_tm.zero_grad()
    out = peft_tm(hidden_states=torch.from_numpy(hidden), encoder_hidden_states=torch.from_numpy(enc),
                  encoder_hidden_states_mask=None, timestep=torch.from_numpy(sigma), img_shapes=[SHAPES],
                  return_dict=False)[0]
    (out * torch.from_numpy(r)).sum().backward()
    layer = dict(peft_tm.named_modules())["transformer_blocks.1.attn.to_k"]
    g = grads["transformer_blocks"]["attn"]["to_qkv"]
    got = {"A": np.asarray(g["lora_A"])[1, 1].T, "B": np.asarray(g["lora_B"])[1, 1].T / scale,
           "m": np.asarray(g["lora_magnitude"])[1, 1]}
    want = {"A": layer.lora_A["a"].weight.grad.numpy(), "B": layer.lora_B["a"].weight.grad.numpy(),
            "m": layer.lora_magnitude_vector["a"].weight.grad.numpy()}
    for k in got:
        assert_close(got[k], want[k], 1e-5, f"DoRA gradient {k}")  # measured ≤ 9.3e-7


# ---- LoKr -------------------------------------------------------------------------------------------
def _lycoris_merged(weight: np.ndarray, w, strength: float = 1.0) -> np.ndarray:
    """LyCORIS's own LokrModule, rebuilt from a file's factors, merged into `weight` [out, in] at `strength`."""
    from lycoris.modules.lokr import LokrModule

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight))
    def t(v):
        return None if v is None else torch.from_numpy(np.ascontiguousarray(v))

    with torch.no_grad():
        mod = LokrModule.make_module_from_state_dict("m", lin, t(w.w1), t(w.w1_a), t(w.w1_b), t(w.w2), t(w.w2_a),
                                                     t(w.w2_b), None, None, torch.tensor(w.alpha or 1.0), None)
        mod.multiplier = strength
        return mod(torch.eye(weight.shape[1])).T.numpy()  # LokrModule.forward on the identity: the merged weight


@pytest.mark.slow
def test_lokr_matches_lycoris(base, tmp_path):
    from lycoris.modules.lokr import LokrModule

    tm, base_path, flat = base
    # rank 8: the 128×128 linears get a full w2 (8 ≥ 16/2, scale 1), the MLP ones a decomposed w2 (alpha/rank)
    lora = q.LoraConfig(rank=8, alpha=4.0, targets=ALL_TARGETS, type="lokr")
    model = q.model_from_params(TINY, q.ModelOptions(lora=lora), flat)
    leaves = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert leaves == {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
    assert not any(np.any(np.asarray(v[...])) for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
                   if p[-1] in ("lokr_w2", "lokr_w2_b"))  # ΔW = 0 at init, as LyCORIS
    model = _trained(model, seed=2)
    ours = _ours(model)
    assert_differs(ours, _ref(tm), 1e-2, "LoKr vs base")  # measured 4.3e-2
    paths = {fmt: save_lora(model, tmp_path / f"lokr_{fmt}.safetensors", format=fmt) for fmt in ("comfyui", "kohya")}
    parsed = read_lora_file(paths["kohya"])
    assert parsed.kind == "lokr" and parsed.style == "kohya" and read_lora_file(paths["comfyui"]).style == "comfyui"
    assert len(parsed.modules) == 2 * 14 and {w.w2 is None for w in parsed.modules.values()} == {True, False}
    # reference: every module's weight merged by LyCORIS's LokrModule, in the torch model
    ref_tm = copy.deepcopy(tm)
    named = dict(ref_tm.named_modules())
    for module, w in parsed.modules.items():
        lin = named[module]
        weight = lin.weight.detach().numpy()
        if module == "transformer_blocks.0.img_mlp.net.0.proj":  # factor shapes as LyCORIS builds them
            ly = LokrModule("m", torch.nn.Linear(weight.shape[1], weight.shape[0]), lora_dim=8, alpha=4.0)
            assert ly.lokr_w1.shape == w.w1.shape and ly.lokr_w2_a.shape == w.w2_a.shape
            assert ly.lokr_w2_b.shape == w.w2_b.shape and float(ly.scale) == w.scale == 0.5
            # measured 7.7e-8
            assert_close(w.merged(weight, 0.7), _lycoris_merged(weight, w, 0.7), 1e-6, "LoKr strength")
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(_lycoris_merged(weight, w)))
    ref = _ref(ref_tm)
    assert_close(ours, ref, 5e-6, "LoKr adapters vs LyCORIS merge")  # measured 3.8e-7
    merged = q.load_transformer(base_path, lora=paths["comfyui"])
    assert_close(_ours(merged), ref, 5e-6, "LoKr merged")  # measured 3.8e-7
    load_lora_into_adapters(_trained(model, seed=8), paths["kohya"])
    _same_tensors(model, paths["kohya"], "kohya")


def test_lokr_factorization_is_lycoris():
    from lycoris.functional import factorization

    for dim in (127, 128, 250, 360, 3072, 12288, 18432):
        for f in (-1, 2, 4, 8, 16):
            assert lokr_factorization(dim, f) == factorization(dim, f), (dim, f)


# ---- which modules and how big ---------------------------------------------------------------------
def test_patterns_match_peft(base, tmp_path):
    import re

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model_state_dict

    tm, _, flat = base
    exclude = r"transformer_blocks\.0\.img_mlp"
    rank_pattern = {"to_k": 2, r"transformer_blocks\.1\.attn\.to_out\.0": 6}
    alpha_pattern = {"to_v": 3.0, "img_mlp.net.2": 1.0}
    lora = q.LoraConfig(rank=4, alpha=8.0, targets=("to_qkv", "to_out", "img_mlp"), exclude=(exclude,),
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    with pytest.raises(ValueError, match="resolve_lora_config"):
        q.init_transformer(TINY, q.ModelOptions(lora=lora))
    model = _trained(q.model_from_params(TINY, q.ModelOptions(lora=lora), flat), seed=3)
    ours = _ours(model)
    path = save_lora(model, tmp_path / "patterns.safetensors")
    # PEFT's own selection and sizes for the same request on the diffusers model
    kinds = r"attn\.to_[qkv]$|attn\.to_out\.0$|img_mlp\.net\.(0\.proj|2)$"  # targets to_qkv, to_out, img_mlp
    names = [n for n, m in tm.named_modules()
             if isinstance(m, torch.nn.Linear) and re.search(kinds, n) and not re.search(exclude, n)]
    peft_tm = copy.deepcopy(tm)
    peft_tm.add_adapter(PeftLoraConfig(r=4, lora_alpha=8.0, target_modules=names, rank_pattern=rank_pattern,
                                       alpha_pattern=alpha_pattern))
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_tm).items()}
    from safetensors.numpy import load_file

    got = {k.removeprefix("transformer."): v.shape for k, v in load_file(path).items()}
    assert got == want
    # the same scales: PEFT's layer.scaling against ours (B·scale is what we export)
    layer = dict(peft_tm.named_modules())["transformer_blocks.1.attn.to_v"]
    assert layer.scaling["default"] == 3.0 / 4 == model.transformer_blocks.attn.to_qkv.lora_layer_scale[...][1, 2]
    ref = _ref(_diffusers_with(tm, path))
    assert_differs(ours, _ref(tm), 1e-2, "patterned LoRA vs base")
    assert_close(ours, ref, 5e-6, "patterned LoRA in diffusers")  # measured 5.2e-7
    load_lora_into_adapters(_trained(model, seed=4), path)
    _same_tensors(model, path, "diffusers")


def test_plan_resolution():
    lora = q.LoraConfig(rank=4, include=(r"transformer_blocks\.1\.",), rank_pattern={"add_k_proj": 8})
    plan = {name: (ranks, alphas) for name, ranks, alphas in resolve_lora_config(lora, 2).plan}
    assert plan["add_qkv_proj"][0] == ((0, 0, 0), (4, 8, 4)) and plan["add_qkv_proj"][1] == ((0, 0, 0), (4, 8, 4))
    assert plan["img_mlp.fc1"][0] == ((0,), (4,)) and "img_mod" not in plan
    with pytest.raises(ValueError, match="select no module"):
        resolve_lora_config(q.LoraConfig(include=("nothing",)), 2)
    with pytest.raises(ValueError, match="not a regular expression"):
        q.LoraConfig(exclude=("(",))
    with pytest.raises(ValueError, match="rank_pattern"):
        q.LoraConfig(rank_pattern={"to_q": 0})
    with pytest.raises(ValueError, match="dora"):
        q.ModelOptions(lora=q.LoraConfig(type="dora"), quantize="int8")


def test_unsupported_adapter_files_are_one_line_errors(tmp_path):
    from safetensors.numpy import save_file

    from qwen_edit_jax.errors import LoraError

    m, z = "transformer_blocks.0.attn.to_q", np.zeros((2, 128), np.float32)
    cases = {
        "LoHa": {f"lycoris_{m.replace('.', '_')}.hada_w1_a": z},
        "dora_scale": {f"diffusion_model.{m}.lora_A.weight": z, f"diffusion_model.{m}.dora_scale": z[:1].T},
        "mixes adapter kinds": {f"transformer.{m}.lora_A.weight": z, f"transformer.{m}.lora_B.weight": z.T,
                                f"lycoris_{'transformer_blocks_1_attn_to_q'}.lokr_w1": z[:, :8]},
        "needs lokr_w2": {f"diffusion_model.{m}.lokr_w1": np.zeros((8, 8), np.float32)},
    }
    for i, (msg, tensors) in enumerate(cases.items()):
        path = str(tmp_path / f"{i}.safetensors")
        save_file(tensors, path)
        with pytest.raises(LoraError, match=msg) as e:
            read_lora_file(path)
        assert "\n" not in str(e.value) and path in str(e.value)
