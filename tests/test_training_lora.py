"""LoRA on the fused projections: zero init is a no-op; split mode = standard q/k/v LoRAs in PEFT.

The adapters are set directly from PEFT's tensors (through the key map only), so this checks the
model's LoRA math independently of the LoRA file code.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import qwen_edit_jax as q
from qwen_edit_jax.config import LoraConfig, ModelOptions
from qwen_edit_jax.weights import keymap
from tests.compare import assert_close, assert_differs, rel_err
from tests.torch_reference import make_torch_model, save_torch_model, torch_forward

TOL = 1e-4  # gradients vs PEFT (not re-measured)
OUT_TOL = 2e-5  # outputs vs PEFT: ≈ 10× the measured ≤ 1.8e-6 (2026-12-07, 2-core CPU)
TINY = q.preset("tiny")
SHAPES = [(1, 4, 4), (1, 2, 4)]
ALL = ("to_qkv", "add_qkv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp", "img_mod", "txt_mod")
PEFT_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tm = make_torch_model(TINY, seed=21)
    return tm, save_torch_model(tm, tmp_path_factory.mktemp("base"))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    n = sum(f * h * w for f, h, w in SHAPES)
    hidden = rng.standard_normal((2, n, TINY.in_channels), dtype=np.float32)
    enc = rng.standard_normal((2, 7, TINY.joint_attention_dim), dtype=np.float32)
    mask = np.ones((2, 7), np.int64)
    mask[1, -3:] = 0
    sigma = np.array([0.3, 0.8], np.float32)
    return hidden, enc, mask, sigma


def _ours(model):
    hidden, enc, mask, sigma = _inputs()
    return np.asarray(model(hidden_states=jnp.asarray(hidden), encoder_hidden_states=jnp.asarray(enc),
                            encoder_hidden_states_mask=jnp.asarray(mask), timestep=jnp.asarray(sigma),
                            img_shapes=[SHAPES] * 2))


def _theirs(tm):
    hidden, enc, mask, sigma = _inputs()
    return torch_forward(tm, hidden, enc, mask, sigma, [SHAPES] * 2)


@pytest.mark.parametrize("qkv_mode", ["split", "shared"])
def test_zero_initialised_lora_is_a_no_op(base, qkv_mode):
    _, path = base
    plain = q.load_transformer(path)
    with_lora = q.load_transformer(path, options=ModelOptions(lora=LoraConfig(rank=4, alpha=7, targets=ALL,
                                                                              qkv_mode=qkv_mode)))
    lora = nnx.state(with_lora, nnx.LoRAParam)
    a = [v for p, v in nnx.to_flat_state(lora) if p[-1] == "lora_A"]
    b = [v for p, v in nnx.to_flat_state(lora) if p[-1] == "lora_B"]
    assert len(a) == len(b) == 10 and all(np.abs(np.asarray(x[...])).max() > 0 for x in a)  # A random
    assert all(not np.asarray(x[...]).any() for x in b)  # B zero
    # unchanged up to fp32 rounding (XLA fuses the extra +0 differently, ~1e-7)
    assert_close(_ours(with_lora), _ours(plain), 3e-6, "zero-initialised LoRA vs none")  # measured 2.4e-7


def _peft_model(tm, rank, alpha, seed, tie_qkv_A=False):
    from peft import LoraConfig as PeftLoraConfig

    t = copy.deepcopy(tm)
    t.add_adapter(PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    mods = {n: m for n, m in t.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(mods) == TINY.num_layers * len(PEFT_TARGETS)
    with torch.no_grad():
        for name, m in mods.items():
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=g) / np.sqrt(a.shape[1]))
            b.copy_(0.5 * torch.randn(b.shape, generator=g) / np.sqrt(b.shape[1]))
        if tie_qkv_A:  # one A per fused projection: what the shared mode can express
            for name, m in mods.items():
                for src, dst in (("to_q", ("to_k", "to_v")), ("add_q_proj", ("add_k_proj", "add_v_proj"))):
                    if name.endswith("attn." + src):
                        for d in dst:
                            mods[name[: -len(src)] + d].lora_A["default"].weight.copy_(m.lora_A["default"].weight)
    return t, mods


def _copy_into_ours(model, mods):
    """Set our adapters from PEFT's per-module A [r, in], B [out, r] through the key map."""
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    values = {k: np.array(v[...]) for k, v in flat.items()}
    shared = model.options.lora.qkv_mode == "shared"
    for name, m in mods.items():
        entry, layer, j = keymap.find_module(name)
        a = m.lora_A["default"].weight.detach().numpy().T  # [in, r]
        b = m.lora_B["default"].weight.detach().numpy().T  # [r, out]
        ka, kb = f"{entry.flax}.lora_A", f"{entry.flax}.lora_B"
        if not entry.fused:
            values[ka][layer], values[kb][layer] = a, b
        elif shared:
            values[ka][layer] = a
            values[kb][layer][:, j, :] = b
        else:
            values[ka][layer, j], values[kb][layer, j] = a, b
    for k, var in flat.items():
        var.set_value(jnp.asarray(values[k]))


@pytest.mark.parametrize("qkv_mode", ["split", "shared"])
def test_lora_equals_peft_qkv_loras(base, qkv_mode):
    tm, path = base
    rank, alpha = 3, 5.0  # scale 5/3 ≠ 1 on both sides
    t, mods = _peft_model(tm, rank, alpha, seed=4, tie_qkv_A=qkv_mode == "shared")
    model = q.load_transformer(path, options=ModelOptions(lora=LoraConfig(rank=rank, alpha=alpha, targets=ALL,
                                                                          qkv_mode=qkv_mode)))
    _copy_into_ours(model, mods)
    ours, ref = _ours(model), _theirs(t)
    assert_differs(ours, _theirs(tm), 1e-2, "lora equals peft qkv loras")  # the adapters matter
    assert_close(ours, ref, OUT_TOL, "LoRA output vs PEFT")


def _torch_grad(weight) -> np.ndarray:
    """A PEFT weight's gradient in our layout (transposed); None (no path to the output) is zero."""
    g = weight.grad
    return np.zeros(weight.shape[::-1], np.float32) if g is None else g.numpy().T


def _grad_close(ours, ref) -> bool:
    """Relative error ≤ TOL; a gradient that is exactly zero in PyTorch (the last block's text queries
    reach no output) must be exactly zero here too."""
    if not np.any(ref):
        return not np.any(ours)
    return rel_err(ours, ref) <= TOL


@pytest.mark.parametrize("qkv_mode", [pytest.param("split", marks=pytest.mark.slow), "shared"])
def test_lora_gradients_equal_peft(base, qkv_mode):
    """dLoss/dA and dLoss/dB of every adapter equal PEFT's autograd ones (the model's hand-written
    backward pieces: LoRA matmuls, tanh-GELU, RoPE tables, flash attention with a padded text mask)."""
    tm, path = base
    rank, alpha = 3, 5.0
    t, mods = _peft_model(tm, rank, alpha, seed=6, tie_qkv_A=qkv_mode == "shared")
    model = q.load_transformer(path, options=ModelOptions(attention="flash", lora=LoraConfig(
        rank=rank, alpha=alpha, targets=ALL, qkv_mode=qkv_mode)))
    _copy_into_ours(model, mods)
    hidden, enc, mask, sigma = _inputs()
    w = np.random.default_rng(9).standard_normal(_ours(model).shape).astype(np.float32)

    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora_state):
        m = nnx.merge(graphdef, lora_state, rest)
        out = m(hidden_states=jnp.asarray(hidden), encoder_hidden_states=jnp.asarray(enc),
                encoder_hidden_states_mask=jnp.asarray(mask), timestep=jnp.asarray(sigma), img_shapes=[SHAPES] * 2)
        return jnp.sum(out * w)

    grads = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(jax.grad(loss)(lora))}
    out = t(hidden_states=torch.from_numpy(hidden), encoder_hidden_states=torch.from_numpy(enc),
            encoder_hidden_states_mask=torch.from_numpy(mask), timestep=torch.from_numpy(sigma),
            img_shapes=[SHAPES] * 2, return_dict=False)[0]
    (out * torch.from_numpy(w)).sum().backward()
    shared = qkv_mode == "shared"
    checked = 0
    for name, m in mods.items():
        entry, layer, j = keymap.find_module(name)
        ga, gb = grads[f"{entry.flax}.lora_A"][layer], grads[f"{entry.flax}.lora_B"][layer]
        ta, tb = _torch_grad(m.lora_A["default"].weight), _torch_grad(m.lora_B["default"].weight)
        if entry.fused:
            gb = gb[:, j, :] if shared else gb[j]
            if not shared:
                ga = ga[j]
        assert _grad_close(gb, tb), name
        if not (entry.fused and shared):  # shared A: our gradient is the sum of PEFT's q, k and v ones
            assert _grad_close(ga, ta), name
            checked += 1
    if shared:
        for name, m in mods.items():
            entry, layer, _ = keymap.find_module(name)
            if entry.fused and name.endswith(("to_q", "add_q_proj")):
                stem = name[: -len("q")] if name.endswith("to_q") else name[: -len("q_proj")]
                parts = [mods[stem + s] for s in (("q", "k", "v") if name.endswith("to_q")
                                                  else ("q_proj", "k_proj", "v_proj"))]
                total = sum(_torch_grad(p.lora_A["default"].weight) for p in parts)
                assert _grad_close(grads[f"{entry.flax}.lora_A"][layer], total), name
                checked += 1
    assert checked >= len(mods) // 2
