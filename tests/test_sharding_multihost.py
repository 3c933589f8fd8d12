"""Multi-host: the whole trainer, `train()`, on 2 processes × 4 CPU devices through `jax.distributed` on
localhost trains exactly like 1 process × 8 devices (sharded loading per host, per-host batch rows, the
real LoRA step, Orbax checkpoints written and restored by all processes, the exported LoRA file gathered
from adapters spread over both hosts), and a mesh run trains like one device without a mesh. All three
runs go at once, in one subprocess job (tests/multihost_runs.py) started ahead by tests/background.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.background import Job

TOL = 1e-5
RUNS = Job("multihost runs", [sys.executable, str(Path(__file__).with_name("multihost_runs.py"))], timeout=1200)


@pytest.fixture(scope="module")
def runs():
    """tests/multihost_runs.py: the same run three ways, at the same time: 1 process × 8 devices,
    2 processes × 4 devices (both on a (2, 2, 2) mesh) and on one device without a mesh."""
    p = RUNS.result()
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"tests/multihost_runs.py printed no result (rc={p.returncode}):\n{p.stderr[-4000:]}"
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["ok"], r.get("error")
    return r["single"], r["multi"], r["one"]


@pytest.mark.slow
@pytest.mark.background(RUNS)
def test_two_processes_really_distributed(runs):
    single, multi, _ = runs
    assert single["processes"] == 1 and single["devices"] == 8 and single["local_devices"] == 8
    for i, r in enumerate(multi):
        assert r["distributed"] and r["process"] == i and r["processes"] == 2
        assert r["devices"] == 8 and r["local_devices"] == 4
        assert r["lora_a_local_shards"] == 4  # each host holds only its own devices' shards
    # each host fed disjoint rows that together are the whole global batch
    rows = [set(r["rows"]) for r in multi]
    assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(range(8))


@pytest.mark.slow
@pytest.mark.background(RUNS)
def test_two_processes_train_the_same_loss(runs):
    """Every step's loss (metrics.jsonl, written by process 0) and the trained adapters' digest (every host)
    equal the one-process run's; each host's own first and last losses: see the trainer test below."""
    single, multi, _ = runs
    ref = single["losses"]
    assert len(ref) == 3 and ref[0] != ref[1]  # the LoRA really trains
    for r in multi:
        errs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref)]
        assert len(r["losses"]) == 3 and max(errs) <= TOL, (r["losses"], ref)
        assert abs(r["digest"] - single["digest"]) / single["digest"] <= TOL


@pytest.mark.slow
@pytest.mark.background(RUNS)
def test_checkpoint_written_and_restored_by_all_hosts(runs):
    single, multi, _ = runs
    for r in [single, *multi]:
        assert r["restored_equal"] and r["meta_step"] == 3
        assert "fsdp" in r["restored_sharding"]  # restored straight into the sharded layout


@pytest.mark.slow
@pytest.mark.background(RUNS)
def test_trainer_runs_multi_host_and_exports_the_same_lora(runs):
    """`train()` on 2 hosts: adapters created once and spread over both hosts (no host holds a whole one),
    the same losses as one host (each host's own), and an exported LoRA file equal to the one-host export."""
    single, multi, _ = runs
    assert single["train_lora_fully_addressable"]
    for r in multi:
        assert not r["train_lora_fully_addressable"]  # each host holds only its devices' adapter shards
        assert r["export_keys"] == single["export_keys"] > 0
        for k in ("train_first_loss", "train_last_loss", "export_sum_sq"):
            assert abs(r[k] - single[k]) <= TOL * abs(single[k]), (k, r[k], single[k])
        assert abs(r["export_sum"] - single["export_sum"]) <= TOL * single["export_sum_sq"] ** 0.5


@pytest.mark.slow
@pytest.mark.background(RUNS)
def test_training_on_a_mesh_matches_one_device(runs):
    """The whole run on a (data 2, fsdp 2, tensor 2) mesh (sharded load, FSDP/tensor-split adapters, sharded
    batch, Orbax saves, gathered export) trains like one device without a mesh: every step's loss, and the
    exported LoRA (Adam normalises each update to about ±lr, so reduction-order noise shows at ~1e-4)."""
    single, _, one = runs
    assert len(one["losses"]) == 3
    np.testing.assert_allclose(single["losses"], one["losses"], rtol=1e-4)
    assert single["export_keys"] == one["export_keys"]
    assert abs(single["export_sum_sq"] - one["export_sum_sq"]) <= 1e-4 * one["export_sum_sq"]
