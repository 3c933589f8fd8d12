"""Multi-host: 2 processes × 4 CPU devices through `jax.distributed` on localhost train exactly like
1 process × 8 devices (sharded loading per host, per-host batch rows, real LoRA step, Orbax
checkpoint written and restored by all processes), and so does the whole trainer, `train()`, down
to the exported LoRA file (gathered from adapters spread over both hosts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import qwen_edit_jax as q
from qwen_edit_jax.training.config import DemoSection
from qwen_edit_jax.training.data import write_cache
from qwen_edit_jax.training.demo import demo_samples
from tests.torch_reference import make_torch_model, save_torch_model

WORKER = Path(__file__).with_name("multihost_worker.py")
TOL = 1e-5
TIMEOUT = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(pid: int, nproc: int, port: int, ckpt: str, out: str, cache: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // nproc}", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(WORKER), str(pid), str(nproc), str(port), ckpt, out, cache],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"worker printed no result (rc={p.returncode}):\n{err[-4000:]}"
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["ok"], r.get("error")
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    ckpt = save_torch_model(make_torch_model(q.preset("tiny"), seed=3), root / "ckpt", sharded=True)
    cache = str(root / "cache")
    write_cache(cache, demo_samples(DemoSection(num_samples=16, latent_sizes=((8, 8),)), 16, 64))
    single = _result(_launch(0, 1, 0, str(ckpt), str(root / "out1"), cache))
    port = _free_port()
    procs = [_launch(i, 2, port, str(ckpt), str(root / "out2"), cache) for i in range(2)]
    multi = [_result(p) for p in procs]
    return single, multi


@pytest.mark.slow
def test_two_processes_really_distributed(runs):
    single, multi = runs
    assert single["processes"] == 1 and single["devices"] == 8 and single["local_devices"] == 8
    for i, r in enumerate(multi):
        assert r["distributed"] and r["process"] == i and r["processes"] == 2
        assert r["devices"] == 8 and r["local_devices"] == 4
        assert r["lora_a_local_shards"] == 4  # each host holds only its own devices' shards
    # each host fed disjoint rows that together are the whole global batch
    rows = [set(r["rows"]) for r in multi]
    assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(range(8))


@pytest.mark.slow
def test_two_processes_train_the_same_loss(runs):
    single, multi = runs
    ref = single["losses"]
    assert len(ref) == 3 and ref[0] != ref[1]  # the LoRA really trains
    for r in multi:
        errs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref)]
        assert max(errs) <= TOL, (r["losses"], ref)
        assert abs(r["digest"] - single["digest"]) / single["digest"] <= TOL


@pytest.mark.slow
def test_checkpoint_written_and_restored_by_all_hosts(runs):
    single, multi = runs
    for r in [single, *multi]:
        assert r["restored_equal"] and r["meta"] == {"step": 3}
        assert "fsdp" in r["restored_sharding"]  # restored straight into the sharded layout


@pytest.mark.slow
def test_trainer_runs_multi_host_and_exports_the_same_lora(runs):
    """`train()` itself on 2 hosts: adapters created once and spread over both hosts (no host holds a
    whole one), the same losses as one host, and an exported LoRA file equal to the one-host export."""
    single, multi = runs
    assert single["train_lora_fully_addressable"]
    for r in multi:
        assert not r["train_lora_fully_addressable"]  # each host holds only its devices' adapter shards
        assert r["export_keys"] == single["export_keys"] > 0
        for k in ("train_first_loss", "train_last_loss", "export_sum_sq"):
            assert abs(r[k] - single[k]) <= TOL * abs(single[k]), (k, r[k], single[k])
        assert abs(r["export_sum"] - single["export_sum"]) <= TOL * single["export_sum_sq"] ** 0.5
