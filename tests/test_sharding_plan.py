"""Training-step plans (`qwen_edit_jax.training.plan`, `benchmarks/memory_plan.py`): FLOP counting on jaxprs,
and an AOT compile of the sharded LoRA step (tiny config, splash attention in shard_map) for a real TPU
topology through libtpu, on this CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from tests.background import Job

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "benchmarks" / "memory_plan.py"


def _plan_module():
    spec = importlib.util.spec_from_file_location("memory_plan", PLAN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_count_flops_scan_remat_and_grad():
    from qwen_edit_jax.training import plan as mp

    w = jnp.ones((3, 64, 64))
    x = jnp.ones((16, 64))

    def f(x, w):
        body = jax.checkpoint(lambda c, wi: (jnp.tanh(c @ wi), None))
        return jax.lax.scan(body, x, w)[0].sum()

    one = 2 * 16 * 64 * 64 * 3  # one forward over 3 layers
    assert mp.count_flops(jax.make_jaxpr(f)(x, w).jaxpr)["global"] == one
    # d/dx: forward + remat recomputation + input-gradient matmul (frozen weights: no dW)
    assert mp.count_flops(jax.make_jaxpr(jax.grad(f))(x, w).jaxpr)["global"] == 3 * one
    assert mp.count_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w).jaxpr)["global"] == 4 * one


def test_count_flops_splash_kernels():
    from qwen_edit_jax.training import plan as mp

    from qwen_edit_jax.models.kernels import get_attention

    splash = get_attention("splash")
    q = jnp.ones((2, 256, 4, 32))
    fwd = 4 * 2 * 4 * 256 * 256 * 32
    assert mp.count_flops(jax.make_jaxpr(lambda q: splash(q, q, q, None).sum())(q).jaxpr)["attention"] == fwd
    grad = jax.make_jaxpr(jax.grad(lambda q: splash(q, q, q, None).sum()))(q).jaxpr
    assert mp.count_flops(grad)["attention"] == 3.5 * fwd  # forward + fused backward (2.5×)
    # one sample per chip: vmap drops the batch of 1 and the kernel sees [H, S, d]; still counted
    one = jax.make_jaxpr(lambda q: splash(q, q, q, None).sum())(q[:1]).jaxpr
    assert mp.count_flops(one)["attention"] == fwd / 2


def test_splash_block_table_and_odd_block():
    """Per-generation splash blocks fitted to the padded length (no extra padding); a 384 block (not a
    power of two, the default target fitted to 384) equals the xla kernel in Pallas interpret mode."""
    from qwen_edit_jax.models.kernels import splash, xla_attention

    v5e = splash.block_sizes(8448, "TPU v5 lite")
    assert (v5e.block_q, v5e.block_kv, v5e.block_kv_dkv, v5e.block_kv_dkv_compute) == (1408,) * 4
    assert splash.block_sizes(8192, "TPU v6 lite").block_q == 1024  # 1408 does not divide 8192
    assert splash.block_sizes(256).block_q == 256 and splash.block_sizes(8448).block_q == 384
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 300, 2, 32)) for i in range(3))
    mask = jnp.arange(300)[None] < 290
    assert splash.block_sizes(splash.padded_length(300)).block_q == 384
    ref = xla_attention(q, k, v, mask)
    assert jnp.max(jnp.abs(splash.splash_attention(q, k, v, mask) - ref)) < 1e-5


def tiny_lora_step_flops(*, batch, img_tokens, txt_tokens, rank, devices, batch_shards, head_shards) -> dict:
    """Matmul FLOPs (2·m·n·k) of one LoRA training step of the tiny preset, counted from the architecture.

    Per block and stream: modulation D→6D (per sample), q|k|v D→3D, out D→D, MLP D→4D→D; LoRA (split q/k/v,
    out, both MLP linears; default targets) adds 2·(in·r + r·out) per token per adapter; outside the blocks
    img_in, txt_in, the timestep MLP (256→D→D), norm_out D→2D (per sample), proj_out D→64. The backward pass
    of a frozen base matmul is one matmul (dx) when its input depends on the adapters (not the modulation,
    img_in, txt_in, the timestep MLP, norm_out), two for each LoRA factor. Attention runs per device on
    its batch and head shards with the sequence padded to 256 (splash's 128-lane blocks), FlashAttention
    accounting: forward 2 S²d matmuls, fused backward 5, and full remat repeats the forward.
    """
    import qwen_edit_jax as q

    c = q.preset("tiny")
    d, f, n_img, n_txt, b = c.inner_dim, 4 * c.inner_dim, img_tokens, txt_tokens, batch
    mm = lambda m, k, n: 2 * m * k * n  # noqa: E731
    mods = 2 * mm(b, d, 6 * d)
    on_lora_path = sum(mm(b * n, d, 3 * d) + mm(b * n, d, d) + mm(b * n, d, f) + mm(b * n, f, d)
                       for n in (n_img, n_txt))
    per_token_lora = 3 * (2 * (d * rank + rank * d)) + 2 * (d * rank + rank * d) + 2 * (2 * (d * rank + rank * f))
    lora = (b * n_img + b * n_txt) * per_token_lora
    block_fwd = mods + on_lora_path + lora
    block_bwd = on_lora_path + 2 * lora
    io_fwd = (mm(b * n_img, c.in_channels, d) + mm(b * n_txt, c.joint_attention_dim, d) + mm(b, 256, d) + mm(b, d, d)
              + mm(b, d, 2 * d) + mm(b * n_img, d, c.in_channels))
    io_bwd = mm(b * n_img, d, c.in_channels)  # proj_out's dx
    no_remat = io_fwd + io_bwd + c.num_layers * (block_fwd + block_bwd)
    sp = 256
    local = (b // batch_shards) * (c.num_attention_heads // head_shards)
    unit = 2 * local * sp * sp * c.attention_head_dim  # one S×S×d matmul on this device
    return {"matmul_no_remat": no_remat / devices,
            "matmul_full_recompute": (no_remat + c.num_layers * block_fwd) / devices,
            "attention": c.num_layers * (2 + 2 + 5) * unit}


AOT_JOB = Job("AOT plan for v5e:2x4", [sys.executable, str(PLAN), "--preset", "tiny", "--topology", "v5e:2x4",
                                        "--height", "128", "--width", "128", "--text-len", "32", "--batch", "8",
                                        "--lora-rank", "8", "--mesh", "1,4,2", "--json"],
              env={"JAX_PLATFORMS": "cpu"}, cwd=str(ROOT), timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="AOT compiles for TPU need the tpu-plan extra (libtpu)")
@pytest.mark.background(AOT_JOB)
def test_aot_plan_for_v5e_topology():
    p = AOT_JOB.result()
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8 and r["device_kind"] == "TPU v5 lite"
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    import qwen_edit_jax as q

    assert r["params"] == q.count_params(q.abstract_model(q.preset("tiny"))) and r["lora_params"] > 0
    assert 0 < r["weights_bytes_per_device"] < r["peak_bytes_per_device"]
    assert r["fits"] and r["attention_flops_per_device"] > 0 and r["matmul_flops_per_device"] > 0
    # FLOPs against a count from the architecture (tiny_lora_step_flops), not the script's own jaxpr walk:
    # attention exactly, matmuls between "no recomputation" and "the whole block recomputed" (full remat
    # recomputes only what the backward pass needs, which is in between)
    per_device = tiny_lora_step_flops(batch=8, img_tokens=2 * 64, txt_tokens=32, rank=8, devices=8, batch_shards=4,
                                      head_shards=2)
    assert r["attention_flops_per_device"] == per_device["attention"]
    lo, hi = per_device["matmul_no_remat"], per_device["matmul_full_recompute"]
    assert lo <= r["matmul_flops_per_device"] <= hi * 1.001, (lo, r["matmul_flops_per_device"], hi)  # + norm dots
    # at 100 % of v5e's published 197 TFLOP/s bf16 peak (cloud.google.com/tpu/docs/v5e)
    attention = per_device["attention"]
    assert (lo + attention) / 197e12 <= r["est_step_s"] <= (hi * 1.001 + attention) / 197e12
    assert "peak / chip" in p.stdout


def test_plan_rejects_unknown_topology():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(PLAN), "--preset", "tiny", "--topology", "v9z:2x2"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode != 0 and "unknown TPU generation" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_plan_quantize_field_and_extrapolation_when_the_compiler_refuses(monkeypatch):
    """`--quantize` reaches the model and the JSON; a refused full-depth compile is replaced by
    temporaries fitted on shorter stacks (marked `extrapolated`), not the error's figure."""
    pytest.importorskip("libtpu", reason="AOT compiles for TPU need the tpu-plan extra (libtpu)")
    from qwen_edit_jax.training import plan as lib

    mod = _plan_module()
    calls = []

    def fake_compile(lowered, arg_bytes):
        calls.append(arg_bytes)
        if len(calls) == 1:  # the full stack: "refused", with a huge (untrue) temporaries figure
            return (dict(argument=arg_bytes, output=0, alias=0, temp=50 << 30, host=0, host_temp=0),
                    arg_bytes + (50 << 30), 0.0, 50 << 30)
        n = len(calls) - 1  # the shorter stacks in order: 1, 2 blocks → temp = 100 + 10·n bytes
        return dict(argument=7, output=5, alias=4, temp=100 + 10 * n, host=0, host_temp=0), 0, 0.0, None

    monkeypatch.setattr(lib, "compile_memory", fake_compile)
    args = mod.parse_args(["--preset", "tiny", "--layers", "4", "--topology", "v5e:2x2", "--height", "64",
                           "--width", "64", "--text-len", "16", "--batch", "4", "--lora-rank", "4",
                           "--mesh", "1,4,1", "--quantize", "int8", "--extrapolate", "1,2", "--attention", "xla"])
    r = mod.plan(args)
    assert r["quantize"] == "int8" and r["num_layers"] == 4
    assert r["peak_source"] == "extrapolated" and r["extrapolated_from"] == {"1": 110, "2": 120}
    assert r["temp_bytes"] == 140 and r["oom_reported_temp_bytes"] == 50 << 30
    assert r["peak_bytes_per_device"] == r["argument_bytes"] + 1 + 140 and r["fits"]
    assert "extrapolated from [" in lib.format_plan(r)
