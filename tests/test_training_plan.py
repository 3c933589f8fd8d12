"""`train/train_lora.py --plan TOPOLOGY` (`qwen_edit_jax.training.plan`): the configured step compiled ahead of
time for a TPU topology through libtpu on this CPU, whether it fits, and the cheapest change that does."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qwen_edit_jax as q
from qwen_edit_jax import parallel
from qwen_edit_jax.training import plan as lib
from qwen_edit_jax.training.config import load_config
from qwen_edit_jax.cache_format import CachedSample, write_cache

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train" / "train_lora.py"
CONFIG = ROOT / "train" / "configs" / "qwen-image-edit.yaml"
TINY = q.preset("tiny")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")

pytest.importorskip("libtpu", reason="AOT compiles for TPU need the tpu-plan extra (libtpu)")


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dit") / "transformer"
    q.save_transformer(q.init_transformer(TINY), path)
    return str(path)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *args], env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def _sample(rng, i, h, w, n_refs, prompt):
    return CachedSample(f"s{i}", rng.standard_normal((16, h, w)).astype(np.float32),
                        [rng.standard_normal((16, h, w)).astype(np.float32) for _ in range(n_refs)],
                        rng.standard_normal((prompt, TINY.joint_attention_dim)).astype(np.float32),
                        np.ones(prompt, bool))


def test_plan_cli_prints_the_fit_and_a_json_line(tiny_dit, tmp_path):
    rng = np.random.default_rng(0)
    cache = write_cache(tmp_path / "cache", [_sample(rng, 0, 16, 16, 1, 20)])
    p = _run("--config", str(CONFIG), "--plan", "v5e:1x1", "--json", f"model.path={tiny_dit}",
             f"data.path={cache}", "data.batch_size=1", "model.quantize=int4")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["fits"] is True and r["suggestion"] is None and r["peak_source"] == "compiled"
    # the model at model.path (its quantized leaves and scales), not the 20.4B preset
    assert r["params"] == q.count_params(q.abstract_model(TINY, q.ModelOptions(quantize="int4")))
    assert r["quantize"] == "int4" and r["offload"] == "none" and r["device_kind"] == "TPU v5 lite"
    assert 0 < r["weights_bytes_per_device"] < r["peak_bytes_per_device"] < r["budget_gib"] * 2**30
    assert (r["height"], r["width"], r["refs"], r["text_tokens"]) == (128, 128, 1, 128)  # the cached sample
    assert "fits as configured" in p.stdout


def test_plan_takes_the_largest_cached_sample(tiny_dit, tmp_path):
    rng = np.random.default_rng(0)
    cache = write_cache(tmp_path / "cache", [_sample(rng, 0, 8, 8, 1, 20), _sample(rng, 1, 16, 12, 2, 70)])
    cfg = load_config(str(CONFIG), [f"model.path={tiny_dit}", f"data.path={cache}", "data.batch_size=2",
                                    "optim.grad_accum=3"])
    wl = lib.config_workload(cfg, lib.config_model(cfg))
    assert wl == lib.Workload(((1, 8, 6),) * 3, text_len=128, batch=2, grad_accum=3)
    # no cache yet: a 1024² edit with one 1024² reference and a 256-token prompt
    said = []
    cfg = load_config(str(CONFIG), [f"model.path={tiny_dit}", f"data.path={tmp_path / 'none'}"])
    wl = lib.config_workload(cfg, lib.config_model(cfg), log=said.append)
    assert wl == lib.Workload(((1, 64, 64),) * 2, text_len=256, batch=8, grad_accum=1)
    assert "no cache at data.path" in said[0]


def test_suggestion_is_the_first_rung_that_fits(tiny_dit, monkeypatch):
    """The ladder (int8, int8 offloaded, int4, int4 offloaded, smaller batch, …) is compiled in order until
    one fits the chip and its host memory; rungs whose device arguments alone exceed the budget are skipped."""
    cfg = load_config(str(CONFIG), [f"model.path={tiny_dit}", "data.batch_size=2"])
    dit, opts = lib.config_model(cfg), cfg.model_options()
    devices = lib.topology_devices("v5e:1x1")
    mesh = parallel.make_mesh(1, 1, 1, devices=devices)
    wl = lib.Workload.square(dit, 256, 1, batch=2)

    def args(**o):
        return lib.build_step(dit, dataclasses.replace(opts, **o), mesh, wl).device_arg_bytes

    int4, offloaded = args(quantize="int4"), args(quantize="int4", offload="base")
    assert offloaded == args(quantize="int8", offload="base") < int4 < args(quantize="int8") < args()
    budget = (int4 + offloaded) / 2
    target = lib.Target("v5e:1x1", devices, lib.Chip("test", 197.0, 1.0, budget / lib.GiB, host_budget_gib=1.0))
    host = iter([2 * lib.GiB, lib.GiB // 10])  # the int8 base overflows the host memory, the int4 one does not
    compiled = []

    def fake_compile(lowered, arg_bytes):  # peak = the device arguments: decided by the rung, not XLA
        compiled.append(arg_bytes)
        return dict(argument=arg_bytes, output=0, alias=0, temp=0, host=next(host), host_temp=0), arg_bytes, 0.0, None

    monkeypatch.setattr(lib, "compile_memory", fake_compile)
    setting, fit, tried = lib.suggest(dit, opts, target, mesh, wl)
    assert setting.overrides == ("model.quantize=int4", "model.offload=base") and fit["fits"]
    assert setting.opts.quantize == "int4" and setting.opts.offload == "base" and setting.workload == wl
    assert [s.overrides for s, _ in tried] == [("model.quantize=int8",), ("model.quantize=int8", "model.offload=base"),
                                               ("model.quantize=int4",), setting.overrides]
    assert compiled == [offloaded, offloaded]  # the rungs without offload exceed the budget with their arguments
    assert [r["peak_source"] for _, r in tried] == ["arguments_lower_bound", "compiled"] * 2
    assert [r["fits"] for _, r in tried] == [False, False, False, True]  # int8 offloaded: 2 GiB of host memory
    # past offload: half the micro-batch with twice the accumulation, then smaller images
    rungs = lib.ladder(dit, setting.opts, wl)
    assert rungs[0].workload.batch == 1 and rungs[0].workload.grad_accum == 2
    assert [r.workload.pixels(dit) for r in rungs[1:]] == [(192, 192), (128, 128)]
    assert "suggested: model.quantize=int4 model.offload=base" in lib.format_suggestion(
        {"fits": False, "suggestion": {"overrides": list(setting.overrides), "recache": False, **{
            k: fit[k] for k in ("peak_gib_per_device", "est_step_s")}}, "tried": []})


def test_plan_errors_are_one_line(tiny_dit):
    p = _run("--config", str(CONFIG), "--plan", "device", f"model.path={tiny_dit}")
    assert p.returncode == 2 and "reports no memory limit" in p.stderr and "Traceback" not in p.stderr
    p = _run("--config", str(CONFIG), "--plan", "v9z:2x2", f"model.path={tiny_dit}")
    assert p.returncode == 2 and "unknown TPU generation" in p.stderr and "Traceback" not in p.stderr
    p = _run("--config", str(CONFIG))
    assert p.returncode == 2 and "--output-dir is required" in p.stderr
