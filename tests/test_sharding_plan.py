"""benchmarks/memory_plan.py: FLOP counting on jaxprs, and an AOT compile of the sharded LoRA step
(tiny config, splash attention in shard_map) for a real TPU topology through libtpu, on this CPU."""

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

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "benchmarks" / "memory_plan.py"


def _plan_module():
    spec = importlib.util.spec_from_file_location("memory_plan", PLAN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_count_flops_scan_remat_and_grad():
    mp = _plan_module()
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
    mp = _plan_module()
    from qwen_edit_jax.models.kernels import get_attention

    splash = get_attention("splash")
    q = jnp.ones((2, 256, 4, 32))
    fwd = 4 * 2 * 4 * 256 * 256 * 32
    assert mp.count_flops(jax.make_jaxpr(lambda q: splash(q, q, q, None).sum())(q).jaxpr)["attention"] == fwd
    grad = jax.make_jaxpr(jax.grad(lambda q: splash(q, q, q, None).sum()))(q).jaxpr
    assert mp.count_flops(grad)["attention"] == 3.5 * fwd  # forward + fused backward (2.5×)


@pytest.mark.slow
def test_aot_plan_for_v5e_topology():
    pytest.importorskip("libtpu", reason="AOT compiles for TPU need the tpu-plan extra (libtpu)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(PLAN), "--preset", "tiny", "--topology", "v5e:2x4", "--height", "128", "--width", "128",
           "--text-len", "32", "--batch", "8", "--lora-rank", "8", "--mesh", "1,4,2", "--json"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8 and r["device_kind"] == "TPU v5 lite"
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert r["params"] == 1_294_976 and r["lora_params"] > 0
    assert 0 < r["weights_bytes_per_device"] < r["peak_bytes_per_device"]
    assert r["fits"] and r["attention_flops_per_device"] > 0 and r["matmul_flops_per_device"] > 0
    assert r["est_step_s"] == pytest.approx(r["flops_per_device"] / 197e12)
    assert "peak / chip" in p.stdout


def test_plan_rejects_unknown_topology():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(PLAN), "--preset", "tiny", "--topology", "v9z:2x2"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode != 0 and "unknown TPU generation" in p.stderr and "Traceback" not in p.stderr
