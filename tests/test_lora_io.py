"""LoRA import/export parity with diffusers (fp32, rel err ≤ 1e-4) for every key style.

Import: random LoRA state dicts in each key style → diffusers applies them (PEFT, via
`QwenImageLoraLoaderMixin.lora_state_dict` + `load_lora_adapter`) → same output as
`load_transformer(base, lora=path)`. Export: a model with non-zero split- and shared-mode
adapters → `save_lora` (each format) → diffusers → same output as our unmerged adapters.
"""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import qwen_edit_jax as q
from qwen_edit_jax.lora import formats
from qwen_edit_jax.errors import LoraError
from qwen_edit_jax.lora import load_lora_into_adapters, read_lora, read_lora_file, save_lora
from qwen_edit_jax.weights import keymap
from qwen_edit_jax.weights.safetensors_io import CheckpointError
from tests.compare import assert_close, assert_differs
from tests.torch_reference import make_torch_model, save_torch_model, torch_forward

TOL = 2e-5  # ours vs diffusers / PEFT with the LoRA: ≈ 10× the measured ≤ 1.0e-6 (2026-12-07, 2-core CPU)
TINY = q.preset("tiny")
SHAPES = [(1, 4, 4), (1, 2, 4)]
ALL_TARGETS = ("to_qkv", "add_qkv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp", "img_mod", "txt_mod")


def _inputs(seed=0, batch=1, txt_len=6):
    rng = np.random.default_rng(seed)
    n = sum(f * h * w for f, h, w in SHAPES)
    hidden = rng.standard_normal((batch, n, TINY.in_channels), dtype=np.float32)
    enc = rng.standard_normal((batch, txt_len, TINY.joint_attention_dim), dtype=np.float32)
    sigma = rng.uniform(0.1, 0.9, size=(batch,)).astype(np.float32)
    return hidden, enc, sigma


def _ours(model, seed=0):
    hidden, enc, sigma = _inputs(seed)
    return np.asarray(model(hidden_states=jnp.asarray(hidden), encoder_hidden_states=jnp.asarray(enc),
                            timestep=jnp.asarray(sigma), img_shapes=[SHAPES]))


def _ref(tm, seed=0):
    hidden, enc, sigma = _inputs(seed)
    return torch_forward(tm, hidden, enc, None, sigma, [SHAPES])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tm = make_torch_model(TINY, seed=5)
    path = save_torch_model(tm, tmp_path_factory.mktemp("base"))
    return tm, path


# ---- random LoRA state dicts in every key style ----------------------------------------------------
def _modules(cfg):
    """Every LoRA-targetable diffusers module name with its (in, out)."""
    shapes = {k[: -len(".weight")]: v for k, v in keymap.torch_shapes(cfg).items()
              if k.endswith(".weight") and len(v) == 2}
    return {m: (s[1], s[0]) for m, s in shapes.items()}


def random_lora(cfg, seed, *, with_alpha: bool, skip=(), rank=None):
    """{module: (A [r,in], B [out,r], alpha or None)}, ranks 2..4 (or `rank`), alphas ≠ rank; all non-zero."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (m, (din, dout)) in enumerate(sorted(_modules(cfg).items())):
        if any(s in m for s in skip):
            continue
        r = rank or 2 + i % 3
        a = (rng.standard_normal((r, din)) / np.sqrt(din)).astype(np.float32)
        b = (0.5 * rng.standard_normal((dout, r)) / np.sqrt(r)).astype(np.float32)
        alpha = float(r * (0.5 + (i % 4) * 0.5)) if with_alpha else None
        out[m] = (a, b, alpha)
    return out


def to_style(lora, style):
    """State dict of `lora` in a key style (as the respective trainer writes it)."""
    sd = {}
    for m, (a, b, alpha) in lora.items():
        flat = m.replace(".", "_")
        if style in ("diffusers", "diffusers+alpha"):
            ka, kb, kal = f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight", f"transformer.{m}.alpha"
        elif style == "lightx2v":
            ka, kb, kal = f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"
        elif style == "kohya":
            ka, kb, kal = f"lora_unet_{flat}.lora_down.weight", f"lora_unet_{flat}.lora_up.weight", f"lora_unet_{flat}.alpha"
        elif style in ("comfyui", "comfyui+alpha"):
            ka, kb, kal = f"diffusion_model.{m}.lora_A.weight", f"diffusion_model.{m}.lora_B.weight", f"diffusion_model.{m}.alpha"
        elif style == "comfyui_down_up":
            ka, kb, kal = (f"diffusion_model.{m}.lora_down.weight", f"diffusion_model.{m}.lora_up.weight",
                           f"diffusion_model.{m}.alpha")
        elif style == "diffsynth":
            ka, kb, kal = f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight", None
        else:
            raise ValueError(style)
        sd[ka], sd[kb] = a, b
        if alpha is not None and kal is not None:
            sd[kal] = np.asarray(alpha, np.float32)
    return sd


STYLES = {  # style → does it carry alpha
    "diffusers": False,
    "lightx2v": True,
    "kohya": True,
    "comfyui": False,
    "comfyui+alpha": True,
    "comfyui_down_up": True,
    "diffsynth": False,
}


def diffusers_with_lora(tm, path, adapter="a", metadata_path=None):
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    sd, meta = QwenImageLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    tm = copy.deepcopy(tm)
    tm.load_lora_adapter(sd, prefix="transformer", adapter_name=adapter, metadata=meta)
    return tm


@pytest.mark.parametrize("style", sorted(STYLES))
def test_import_matches_diffusers(base, tmp_path, style):
    tm, base_path = base
    lora = random_lora(TINY, seed=len(style), with_alpha=STYLES[style])
    path = str(tmp_path / f"{style}.safetensors")
    save_file(to_style(lora, style), path)

    parsed = read_lora_file(path)
    assert set(parsed.modules) == set(lora)
    for m, (a, b, alpha) in lora.items():
        w = parsed.modules[m]
        assert np.array_equal(w.A, a) and np.array_equal(w.B, b)
        assert w.scale == pytest.approx(alpha / a.shape[0] if alpha is not None else 1.0)

    ref = _ref(diffusers_with_lora(tm, path))
    ours = _ours(q.load_transformer(base_path, lora=path))
    assert_differs(ref, _ref(tm), 1e-2, "import matches diffusers")  # the LoRA really changes the output
    assert_close(ours, ref, TOL, "import matches diffusers")


def test_import_peft_metadata_alpha(base, tmp_path):
    """diffusers `save_lora_weights` files carry alpha in the PEFT metadata, not as tensors."""
    tm, base_path = base
    lora = random_lora(TINY, seed=11, with_alpha=False, rank=4)
    path = str(tmp_path / "meta.safetensors")
    meta = {"transformer.r": 4, "transformer.lora_alpha": 6.0, "transformer.target_modules": sorted(lora),
            "transformer.alpha_pattern": {"transformer_blocks.1.attn.to_k": 2.0}}
    save_file(to_style(lora, "diffusers"), path, metadata={"lora_adapter_metadata": json.dumps(meta)})
    loras = read_lora(path)
    assert loras["transformer_blocks.0.attn.to_q"].scale == pytest.approx(6.0 / 4)
    assert loras["transformer_blocks.1.attn.to_k"].scale == pytest.approx(2.0 / 4)
    ref = _ref(diffusers_with_lora(tm, path))
    assert_close(_ours(q.load_transformer(base_path, lora=path)), ref, TOL, "import peft metadata alpha")


def test_import_comfyui_model_prefix_and_fused_original(base, tmp_path):
    """`model.diffusion_model.` prefixes and the original merged-QKV LoRA (`to_qkv`, shared A, B [3D, r])."""
    tm, base_path = base
    lora = random_lora(TINY, seed=3, with_alpha=False)
    ref_path = str(tmp_path / "ref.safetensors")
    save_file(to_style(lora, "comfyui"), ref_path)
    ref = _ref(diffusers_with_lora(tm, ref_path))

    prefixed = {"model." + k: v for k, v in to_style(lora, "comfyui").items()}
    p1 = str(tmp_path / "model_prefix.safetensors")
    save_file(prefixed, p1)
    assert_close(_ours(q.load_transformer(base_path, lora=p1)), ref, TOL, "ComfyUI prefix, fused original")

    # Original merged-QKV layout: one shared A per fused projection, B stacked by rows. Build the
    # equivalent standard LoRA (A copied, B split by rows) for diffusers.
    rng = np.random.default_rng(7)
    d, r = TINY.inner_dim, 3
    fused_sd, split = {}, {}
    for layer in range(TINY.num_layers):
        for fused, parts in (("attn.to_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
                             ("attn.add_qkv_proj", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))):
            a = (rng.standard_normal((r, d)) / np.sqrt(d)).astype(np.float32)
            b = (0.5 * rng.standard_normal((3 * d, r))).astype(np.float32)
            fused_sd[f"transformer_blocks.{layer}.{fused}.lora_A.default.weight"] = a
            fused_sd[f"transformer_blocks.{layer}.{fused}.lora_B.default.weight"] = b
            for j, p in enumerate(parts):
                split[f"transformer_blocks.{layer}.{p}"] = (a, b[j * d:(j + 1) * d], None)
    p2, p3 = str(tmp_path / "fused.safetensors"), str(tmp_path / "split.safetensors")
    save_file(fused_sd, p2)
    save_file(to_style(split, "diffsynth"), p3)
    assert read_lora_file(p2).fused_modules
    ref2 = _ref(diffusers_with_lora(tm, p3))
    assert_close(_ours(q.load_transformer(base_path, lora=p2)), ref2, TOL, "ComfyUI prefix, fused original")


def test_multiple_loras_with_strengths(base, tmp_path):
    tm, base_path = base
    p1, p2 = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    save_file(to_style(random_lora(TINY, 21, with_alpha=True), "kohya"), p1)
    save_file(to_style(random_lora(TINY, 22, with_alpha=False, skip=("mod",)), "diffusers"), p2)
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    t = copy.deepcopy(tm)
    t.load_lora_adapter(QwenImageLoraLoaderMixin.lora_state_dict(p1), prefix="transformer", adapter_name="one")
    t.load_lora_adapter(QwenImageLoraLoaderMixin.lora_state_dict(p2), prefix="transformer", adapter_name="two")
    t.set_adapters(["one", "two"], weights=[0.5, 1.5])
    ours = q.load_transformer(base_path, lora=[(p1, 0.5), (p2, 1.5)])
    assert_close(_ours(ours), _ref(t), TOL, "multiple loras with strengths")


def test_merge_in_bf16_changes_only_lora_modules(base, tmp_path):
    """Merging into bf16 weights touches exactly the targeted slices (q only, layer 1 only here)."""
    _, base_path = base
    rng = np.random.default_rng(0)
    d = TINY.inner_dim
    p = str(tmp_path / "q_only.safetensors")
    save_file({"transformer.transformer_blocks.1.attn.to_q.lora_A.weight": rng.standard_normal((2, d)).astype(np.float32),
               "transformer.transformer_blocks.1.attn.to_q.lora_B.weight": rng.standard_normal((d, 2)).astype(np.float32)}, p)
    plain = q.load_transformer(base_path, dtype=jnp.bfloat16)
    merged = q.load_transformer(base_path, dtype=jnp.bfloat16, lora=p)
    k0 = np.asarray(plain.transformer_blocks.attn.to_qkv.kernel[...], np.float32)
    k1 = np.asarray(merged.transformer_blocks.attn.to_qkv.kernel[...], np.float32)
    changed = np.argwhere(np.any(k0 != k1, axis=(1, 3)))
    assert changed.tolist() == [[1, 0]]  # layer 1, slice q
    assert k1.dtype == np.float32 and merged.transformer_blocks.attn.to_qkv.kernel[...].dtype == jnp.bfloat16


# ---- export ---------------------------------------------------------------------------------------
def _model_with_adapters(tm_path, qkv_mode, seed):
    cfg = q.DiTConfig.from_json(f"{tm_path}/config.json")
    base_model = q.load_transformer(tm_path)
    flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(base_model, nnx.Param))}
    opts = q.ModelOptions(lora=q.LoraConfig(rank=3, alpha=6.0, targets=ALL_TARGETS, qkv_mode=qkv_mode))
    model = q.model_from_params(cfg, opts, flat, lora_seed=seed)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "lora_B":
            var.set_value(jnp.asarray(0.3 * rng.standard_normal(var.shape) / np.sqrt(var.shape[-1]), jnp.float32))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("qkv_mode", ["split", "shared"])
def test_export_loads_in_diffusers(base, tmp_path, qkv_mode):
    tm, base_path = base
    model = _model_with_adapters(base_path, qkv_mode, seed=1)
    ours = _ours(model)
    assert_differs(ours, _ours(q.load_transformer(base_path)), 2e-3, "LoRA vs base")  # measured 1.7e-2
    for fmt in ("diffusers", "comfyui", "kohya", "diffsynth"):
        path = save_lora(model, tmp_path / f"{qkv_mode}_{fmt}.safetensors", format=fmt)
        assert read_lora_file(path).style == fmt
        ref = _ref(diffusers_with_lora(tm, path, adapter=fmt))
        assert_close(ours, ref, TOL, f"export loads in diffusers {fmt}")
        # and merged back through our own loader
        assert_close(_ours(q.load_transformer(base_path, lora=path)), ours, TOL, "export loads in diffusers")


def test_export_shared_copies_A_and_splits_B(base, tmp_path):
    _, base_path = base
    model = _model_with_adapters(base_path, "shared", seed=2)
    loras = read_lora(save_lora(model, tmp_path / "s.safetensors"))
    mod = model.transformer_blocks.attn.to_qkv
    a = np.asarray(mod.lora_A[...])[1]  # layer 1, [in, r]
    b = np.asarray(mod.lora_B[...])[1] * mod.lora_scale  # [r, 3, D]
    for j, n in enumerate(("to_q", "to_k", "to_v")):
        w = loras[f"transformer_blocks.1.attn.{n}"]
        assert np.array_equal(w.A, a.T) and w.scale == 1.0
        np.testing.assert_array_equal(w.B, b[:, j, :].T)


@pytest.mark.parametrize("src_mode,dst_mode", [("split", "split"), ("shared", "shared"), ("shared", "split")])
def test_load_lora_into_adapters_roundtrip(base, tmp_path, src_mode, dst_mode):
    _, base_path = base
    src = _model_with_adapters(base_path, src_mode, seed=3)
    path = save_lora(src, tmp_path / "x.safetensors", format="kohya")
    dst = _model_with_adapters(base_path, dst_mode, seed=9)
    load_lora_into_adapters(dst, path)
    assert_close(_ours(dst), _ours(src), 1e-6, "load lora into adapters roundtrip")  # measured 0
    if src_mode == dst_mode:  # same parameterisation: identical parameters (scale 2 is a power of two)
        for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(src, nnx.LoRAParam)),
                                      nnx.to_flat_state(nnx.state(dst, nnx.LoRAParam))):
            assert p1 == p2 and np.array_equal(np.asarray(v1[...]), np.asarray(v2[...])), p1


def test_load_independent_qkv_into_shared_adapter_fails(base, tmp_path):
    _, base_path = base
    src = _model_with_adapters(base_path, "split", seed=4)
    path = save_lora(src, tmp_path / "x.safetensors")
    dst = _model_with_adapters(base_path, "shared", seed=4)
    with pytest.raises(LoraError, match="shared-mode"):
        load_lora_into_adapters(dst, path)


# ---- key parsing and bad LoRA files ----------------------------------------------------------------
def test_kohya_unflatten_covers_every_module():
    for m in _modules(TINY):
        assert formats.unflatten_kohya(m.replace(".", "_")) == m
    assert formats.unflatten_kohya("transformer_blocks_3_attn_to_qkv") == "transformer_blocks.3.attn.to_qkv"
    assert formats.unflatten_kohya("lora_te_text_model_encoder") is None


def test_bad_lora_files(base, tmp_path):
    _, base_path = base
    rng = np.random.default_rng(0)
    d = TINY.inner_dim
    a, b = rng.standard_normal((2, d)).astype(np.float32), rng.standard_normal((d, 2)).astype(np.float32)

    def write(name, sd):
        p = str(tmp_path / name)
        save_file(sd, p)
        return p

    nothing = write("nothing.safetensors", {"transformer.single_blocks.0.qkv.lora_A.weight": a,
                                            "transformer.single_blocks.0.qkv.lora_B.weight": b})
    with pytest.raises(LoraError, match=r"match nothing.*single_blocks\.0\.qkv"):
        read_lora(nothing)
    missing_b = write("missing_b.safetensors", {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a})
    with pytest.raises(LoraError, match="has no lora_B"):
        read_lora(missing_b)
    bad_rank = write("bad_rank.safetensors", {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
                                              "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b[:, :1]})
    with pytest.raises(LoraError, match="rank-r pair"):
        read_lora(bad_rank)
    base_file = f"{base_path}/diffusion_pytorch_model.safetensors"
    with pytest.raises(LoraError, match="not LoRA tensors"):
        read_lora(base_file)
    wrong_width = write("wide.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, d + 1), np.float32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((d, 2), np.float32)})
    with pytest.raises(LoraError, match=r"wide\.safetensors.*to_q.*another model size"):
        q.load_transformer(base_path, lora=wrong_width)
    deep = write("deep.safetensors", {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": a,
                                      "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": b})
    with pytest.raises(LoraError, match=r"deep\.safetensors.*beyond the model's 2 layers"):
        q.load_transformer(base_path, lora=deep)
    trunc = str(tmp_path / "trunc.safetensors")
    ok = write("ok.safetensors", {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
                                  "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b})
    with open(ok, "rb") as f, open(trunc, "wb") as g:
        g.write(f.read()[:-100])
    with pytest.raises(CheckpointError, match="trunc.safetensors.*not a readable safetensors"):
        read_lora(trunc)

