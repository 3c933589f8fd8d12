"""Optimizers (AdamW, Adafactor, Prodigy, schedule-free AdamW), LoRA+, EMA, timestep bounds and wandb.

Optax itself is the reference and is not re-tested: the updates are compared with optax only where our
code adds something (clipping before the optimizer, LoRA+'s per-group rate, the schedule-free
composition); the EMA with diffusers' `EMAModel`. The checkpoint round trips use the tiny model's real
LoRA tree with a cheap stand-in loss (one small program per optimizer); the end-to-end run trains the
tiny model once and resumes it through the persistent compilation cache.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import qwen_edit_jax as q
from qwen_edit_jax.cache_format import write_cache
from qwen_edit_jax.testing.latent import LatentDemo, demo_samples
from qwen_edit_jax.testing.random_weights import write_random_transformer
from qwen_edit_jax.training import loop
from qwen_edit_jax.training.checkpoint import TrainCheckpointer
from qwen_edit_jax.training.config import ConfigError, ObjectiveSection, OptimSection, WandbSection, config_from_dict
from qwen_edit_jax.training.ema import EmaState, with_ema
from qwen_edit_jax.training.objective import sample_timesteps, timestep_table
from qwen_edit_jax.training.run_log import RunLog
from qwen_edit_jax.training.step import ema_params, eval_params, make_optimizer, split_lora
from tests.compare import assert_close

TINY = q.preset("tiny")


def _tree(seed=0):
    """A small adapter-like tree: lora_A / lora_B leaves, a DoRA magnitude (keeps the base rate)."""
    rng = np.random.default_rng(seed)
    return {"blk": {"to_q": {"lora_A": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
                             "lora_B": jnp.asarray(0.1 * rng.standard_normal((3, 5)), jnp.float32)},
                    "to_k": {"lora_A": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
                             "lora_B": jnp.asarray(0.1 * rng.standard_normal((3, 5)), jnp.float32),
                             "lora_magnitude": jnp.asarray(1 + rng.random(5), jnp.float32)}}}


def _grads(params, i):
    return jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(100 + i).standard_normal(p.shape), p.dtype)
                        + 0.5 * p, params)


def _run(tx, params, steps):
    state = tx.init(params)
    for i in range(steps):
        params, state = _apply(tx, params, state, _grads(params, i))
    return params, state


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ---- the update against optax where our code adds something --------------------------------------------
def _reference(name, lr, wd):
    """optax's own optimizer for `name` at rate `lr` (no clipping), configured as make_optimizer documents."""
    if name == "adamw":
        return optax.adamw(lr, weight_decay=wd)
    if name == "adafactor":
        return optax.adafactor(lr, multiply_by_parameter_scale=False, weight_decay_rate=wd * lr)
    if name == "prodigy":
        return optax.contrib.prodigy(lr, weight_decay=wd)
    return optax.contrib.schedule_free_adamw(lr, weight_decay=wd)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "prodigy", "schedule_free_adamw"])
def test_clipping_comes_before_the_optimizer(name):
    """Ours with max_grad_norm = optax's optimizer fed gradients clipped by hand to that global norm."""
    lr = 1.0 if name == "prodigy" else 1e-2
    cfg = OptimSection(optimizer=name, learning_rate=lr, weight_decay=0.01, max_grad_norm=0.5)
    tx, _ = make_optimizer(cfg, 10)
    ref = _reference(name, lr, 0.01)
    params = p_ref = _tree()
    s, s_ref = tx.init(params), ref.init(params)
    for i in range(3):
        g = _grads(params, i)
        norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(g)))
        assert norm > 0.5  # clipping is active
        u, s = tx.update(g, s, params)
        params = optax.apply_updates(params, u)
        g_ref = _grads(p_ref, i)
        g_ref = jax.tree.map(lambda x: x * (0.5 / np.sqrt(sum(np.sum(np.square(np.asarray(y, np.float64)))
                                                               for y in jax.tree.leaves(g_ref)))), g_ref)
        u, s_ref = ref.update(g_ref, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    for a, b in zip(_leaves(params), _leaves(p_ref)):
        assert_close(a, b, 1e-6, f"{name} with clipping vs optax on clipped gradients")  # measured 0 (bit-equal)
    if name == "schedule_free_adamw":  # the evaluation parameters as optax computes them
        for a, b in zip(_leaves(eval_params(s, params)),
                        _leaves(optax.contrib.schedule_free_eval_params(s_ref, p_ref))):
            assert_close(a, b, 1e-6, "schedule-free evaluation parameters")  # measured 0 (bit-equal)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "schedule_free_adamw"])
def test_lora_plus_is_a_parameter_group_at_ratio_times_the_rate(name):
    """LoRA+ ratio 16: B's leaves move as optax's optimizer at 16 × lr run on B alone, the others as at lr."""
    lr, ratio = 1e-2, 16.0
    tx, _ = make_optimizer(OptimSection(optimizer=name, learning_rate=lr, weight_decay=0.01, max_grad_norm=None,
                                        lora_plus_ratio=ratio), 10)
    params = _tree()
    ours, _ = _run(tx, params, 2)  # the second step: from a known, non-trivial state
    is_b = {"blk": {"to_q": {"lora_A": False, "lora_B": True},
                    "to_k": {"lora_A": False, "lora_B": True, "lora_magnitude": False}}}
    for group, rate in ((True, lr * ratio), (False, lr)):
        ref_tx = optax.masked(_reference(name, rate, 0.01), jax.tree.map(lambda b: b == group, is_b))
        ref, _ = _run(ref_tx, params, 2)
        for a, b, m in zip(_leaves(ours), _leaves(ref), jax.tree.leaves(is_b)):
            if m == group:
                # measured 0 (bit-equal; 16 is a power of two)
                assert_close(a, b, 1e-6, f"{name} LoRA+ group {'B' if group else 'A'}")
    step_a = np.abs(np.asarray(ours["blk"]["to_q"]["lora_A"] - params["blk"]["to_q"]["lora_A"])).mean()
    step_b = np.abs(np.asarray(ours["blk"]["to_q"]["lora_B"] - params["blk"]["to_q"]["lora_B"])).mean()
    assert step_b > 4 * step_a  # B really moves faster


def test_ema_matches_diffusers_ema_model():
    """with_ema over 6 updates = diffusers' EMAModel (decay warm-up (1+t)/(10+t), first update copies)."""
    import torch
    from diffusers.training_utils import EMAModel

    params = _tree()
    tx = with_ema(optax.sgd(0.3), 0.9)
    state = tx.init(params)
    torch_params = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in jax.tree.leaves(params)]
    ref = EMAModel(torch_params, decay=0.9)
    for i in range(6):
        u, state = tx.update(_grads(params, i), state, params)
        params = optax.apply_updates(params, u)
        with torch.no_grad():
            for t, p in zip(torch_params, jax.tree.leaves(params)):
                t.copy_(torch.tensor(np.asarray(p)))
        ref.step(torch_params)
    assert int(state.count) == 6
    for a, b in zip(_leaves(state.ema), ref.shadow_params):
        assert_close(a, b.numpy(), 1e-6, "EMA vs diffusers EMAModel")  # measured 8.8e-8


def _apply(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


# ---- checkpoint round trip of each optimizer (with LoRA+ and EMA where they apply) -----------------------
@pytest.mark.parametrize("optim, ema", [
    (dict(optimizer="adamw", lora_plus_ratio=4.0), 0.9),
    (dict(optimizer="adafactor"), None),
    (dict(optimizer="prodigy", learning_rate=1.0), None),
    (dict(optimizer="schedule_free_adamw", warmup_steps=1, lora_plus_ratio=4.0), 0.9),
])
def test_optimizer_checkpoint_round_trip_is_bit_identical(tmp_path, optim, ema):
    """4 steps in one go = 2 steps, an Orbax save, a restore into a fresh state, 2 more steps: bit for bit.
    (The model's step is the same for every optimizer and its resume is tested in test_training_loop; here
    the gradients are a cheap stand-in, so each case compiles only the optimizer's update.)"""
    tx, _ = make_optimizer(OptimSection(**optim), 10, ema_decay=ema)
    lora_tree = _tree()
    step = jax.jit(lambda params, state, grads: _apply(tx, params, state, grads))

    def run(params, state, start, stop):
        for i in range(start, stop):
            params, state = step(params, state, _grads(params, i))
        return params, state

    fresh = lambda: (jax.tree.map(jnp.copy, lora_tree), tx.init(lora_tree))  # noqa: E731
    p_ref, s_ref = run(*fresh(), 0, 4)
    p, s = run(*fresh(), 0, 2)
    ck = TrainCheckpointer(tmp_path / "ck", async_save=False)
    ck.save(2, p, s, {"step": 2})
    assert ck.has_ema(2) == (ema is not None)
    p, s, meta = ck.restore(2, *fresh())
    ck.close()
    assert meta["step"] == 2
    p, s = run(p, s, 2, 4)
    for a, b in zip(_leaves((p, s)), _leaves((p_ref, s_ref))):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_leaves(p)[1], _leaves(lora_tree)[1])  # it trained
    if ema is not None:
        assert isinstance(s, EmaState) and ema_params(s) is not None
        assert all(not np.array_equal(a, b) for a, b in zip(_leaves(ema_params(s)), _leaves(eval_params(s, p))))


# ---- timestep bounds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["diffsynth", "uniform", "logit_normal", "resolution_shift"])
def test_timestep_bounds(sampling):
    full = timestep_table(ObjectiveSection(timestep_sampling=sampling), 64)
    table = timestep_table(ObjectiveSection(timestep_sampling=sampling, min_timestep=200, max_timestep=700), 64)
    t_full = full.sigmas.astype(np.float64) * 1000
    allowed = (t_full >= 200) & (t_full <= 700)
    np.testing.assert_array_equal(table.sigmas, full.sigmas[allowed])  # exactly the grid's points in range
    np.testing.assert_array_equal(table.weights, full.weights[allowed])  # weights as on the full grid
    sigma, weight = sample_timesteps(jax.random.key(0), 40000, table)
    t = np.asarray(sigma, np.float64) * 1000
    assert t.min() >= 200 - 1e-3 and t.max() <= 700 + 1e-3
    idx = np.searchsorted(-table.sigmas, -np.asarray(sigma))  # descending grid → index
    np.testing.assert_array_equal(table.sigmas[idx], np.asarray(sigma))
    np.testing.assert_array_equal(table.weights[idx], np.asarray(weight))
    if table.index_distribution == "uniform":  # uniform over the allowed indices: 10 bins within 6 %
        counts = np.histogram(idx, bins=10, range=(0, len(table.sigmas)))[0]
        assert np.all(np.abs(counts / counts.mean() - 1) < 0.06), counts
    else:  # logit-normal index mapped onto the allowed part: the median index is the middle one
        assert abs(np.median(idx) / len(table.sigmas) - 0.5) < 0.02
    with pytest.raises(ConfigError, match=r"objective.min_timestep=0.*max_timestep=0.5: no timestep"):
        timestep_table(ObjectiveSection(timestep_sampling=sampling, min_timestep=0, max_timestep=0.5), 64)


# ---- config errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, values, message", [
    ("optim", {"optimizer": "prodigy"}, r"optim.learning_rate=0.0001: with optim.optimizer=prodigy .*about 1.0"),
    ("optim", {"optimizer": "prodigy", "learning_rate": 1.0, "lora_plus_ratio": 16},
     r"optim.lora_plus_ratio=16.0: not with optim.optimizer=prodigy"),
    ("optim", {"optimizer": "schedule_free_adamw", "schedule": "cosine"},
     r"optim.schedule='cosine': must be constant with optim.optimizer=schedule_free_adamw"),
    ("optim", {"optimizer": "sgd"}, r"optim.optimizer='sgd' is not one of \['adamw', 'adafactor'"),
    ("optim", {"lora_plus_ratio": 0}, r"optim.lora_plus_ratio=0.0: must be positive"),
    ("train", {"ema_decay": 1.0}, r"train.ema_decay=1.0: must be in \(0, 1\)"),
    ("objective", {"min_timestep": 600, "max_timestep": 400}, r"objective.max_timestep=400.0: must exceed"),
    ("objective", {"max_timestep": 1001}, r"objective.max_timestep=1001.0: must be in \(0, 1000\]"),
    ("log", {"wandb": {"entity": "me"}}, r"log.wandb.project='': required"),
])
def test_bad_values_are_one_line_errors(section, values, message):
    d = {"model": {"path": "m"}, "data": {"path": "d"}, section: values}
    with pytest.raises(ConfigError, match=message) as e:
        config_from_dict(d)
    assert "\n" not in str(e.value)


# ---- the run end to end: schedule-free + LoRA+ + EMA + timestep bounds, resumed ----------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    base = write_random_transformer(d / "base", TINY, seed=11)
    demo = LatentDemo(num_samples=8, latent_sizes=((8, 8),), num_edits=3, prompt_lengths=(4, 10))
    data = write_cache(d / "cache", demo_samples(demo, 16, TINY.joint_attention_dim))
    return str(base), str(data)


def _cfg(assets, **sections):
    base, data = assets
    d = {"model": {"path": base, "param_dtype": "float32", "dtype": "float32", "remat": "none"},
         "lora": {"rank": 4, "alpha": 8},
         "data": {"path": data, "batch_size": 2, "text_buckets": [16], "prefetch": 1},
         "objective": {"min_timestep": 100, "max_timestep": 900},
         "optim": {"optimizer": "schedule_free_adamw", "learning_rate": 3e-3, "warmup_steps": 1,
                   "lora_plus_ratio": 4.0},
         "train": {"max_steps": 3, "save_every": 1, "ema_decay": 0.9, "progress": False, "tensorboard": False}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return config_from_dict(d)


@pytest.mark.slow
def test_run_with_ema_resumes_bit_identical_and_exports_both(assets, tmp_path):
    loop.train(_cfg(assets), tmp_path / "ref", log=lambda m: None)
    out = tmp_path / "run"
    loop.train(_cfg(assets, train={"max_steps": 2}), out, log=lambda m: None)
    logs = []
    res = loop.train(_cfg(assets), out, log=logs.append)  # resumes at step 2 (the same compiled program)
    assert any("resuming from" in m for m in logs)
    for name in ("lora_diffusers.safetensors", "lora_diffusers_ema.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(tmp_path / "ref" / name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert res.lora_files == [str(out / "lora_diffusers.safetensors"), str(out / "lora_diffusers_ema.safetensors")]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0.1 <= r["sigma"] <= 0.9 for r in rows)  # t in [100, 900]
    trained, ema = load_file(res.lora_files[0]), load_file(res.lora_files[1])
    assert any(not np.array_equal(trained[k], ema[k]) for k in trained)
    # the exported adapters are the schedule-free evaluation parameters and the EMA of those
    ck = TrainCheckpointer(out / "checkpoints")
    tx, _ = make_optimizer(_cfg(assets).optim, 3, ema_decay=0.9)
    p, s, _ = ck.restore(3, res.lora_params, tx.init(res.lora_params))
    ck.close()
    for a, b in zip(_leaves(eval_params(s, p)), _leaves(res.lora_params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(ema_params(s)), _leaves(res.ema_params)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(p), _leaves(res.lora_params)))


def test_ema_cannot_resume_a_checkpoint_without_one(assets, tmp_path):
    cfg = _cfg(assets, train={"ema_decay": None})
    model = q.load_transformer(assets[0], options=cfg.model_options())
    _, params, _ = split_lora(model)
    tx, _ = make_optimizer(cfg.optim, 3)
    out = tmp_path / "run"
    ck = TrainCheckpointer(out / "checkpoints", async_save=False)
    ck.save(1, params, tx.init(params), {"step": 1})
    ck.close()
    with pytest.raises(ConfigError, match=r"train.ema_decay=0.9: .*checkpoints/1 was saved without an EMA .*"
                                          r"resume with train.ema_decay=null"):
        loop.train(_cfg(assets), out, log=lambda m: None)


def test_validation_uses_the_ema_weights():
    seen = []
    steps = loop._Steps.__new__(loop._Steps)
    steps.validation = lambda step, params, base: seen.append(params) or ({"validation_distance": 1.0}, None, None)
    steps.base, records = None, []
    steps.run_log = type("L", (), {"scalars": lambda self, step, rec: records.append(rec)})()
    params = _tree()
    tx, _ = make_optimizer(OptimSection(optimizer="schedule_free_adamw", max_grad_norm=None), 10, ema_decay=0.5)
    p, s = _run(tx, params, 3)
    steps.validate(3, p, s)
    assert seen[0] is s.ema and records[0]["validation_weights"] == "ema"
    tx, _ = make_optimizer(OptimSection(optimizer="schedule_free_adamw", max_grad_norm=None), 10)
    p, s = _run(tx, params, 3)
    steps.validate(3, p, s)
    for a, b in zip(_leaves(seen[1]), _leaves(optax.contrib.schedule_free_eval_params(s[1], p))):
        np.testing.assert_array_equal(a, b)
    assert records[1]["validation_weights"] == "trained"


# ---- wandb ---------------------------------------------------------------------------------------------------
def test_wandb_offline_gets_the_scalars_and_grids(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLog(str(tmp_path), resumed_step=0, enabled=True, tensorboard=False,
                 wandb=WandbSection(project="qwen-edit-jax-test", mode="offline"), config={"optim": {"lr": 1}})
    log.scalars(1, {"loss": 0.5, "lr": 1e-4, "epoch": 0})
    log.scalars(2, {"loss": 0.25, "lr": 1e-4, "epoch": 0})
    log.scalars(2, {"validation_distance": 0.7, "validation_weights": "ema"})
    log.image("validation/grid", 2, Image.new("RGB", (8, 6), (255, 0, 0)))
    run_id = log.wandb.id
    log.close()
    runs = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
    assert len(runs) == 1, os.listdir(tmp_path / "wandb")
    history = _read_history(os.path.join(runs[0], f"run-{run_id}.wandb"), steps=2)  # what `wandb sync` uploads
    assert _history(history, "train/loss") == [0.5, 0.25] and _history(history, "train/lr") == [1e-4]
    assert _history(history, "validation/validation_distance") == [0.7] and _history(history, "_step") == [1, 2]
    assert not _history(history, "train/epoch") and b"validation_weights" not in history  # numbers only
    assert glob.glob(os.path.join(runs[0], "files", "media", "images", "validation", "grid_2_*.png"))
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2]


def _read_history(path: str, steps: int, timeout: float = 30.0) -> bytes:
    """The offline run's record log once it holds `steps` steps: wandb's service process may still be
    writing it when `finish()` returns (measured: 7 bytes right after, complete 0.5 s later)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            data = f.read()
        if len(_history(data, "_step")) >= steps or time.monotonic() > deadline:
            return data
        time.sleep(0.1)


def _history(record_log: bytes, key: str) -> list:
    """The values logged under `key` in an offline run's record log: protobuf `HistoryItem`s (field 2 the
    key, field 16 the value as JSON), read without wandb's internal modules; each distinct value once, in order
    (the log holds every row twice: the request and the history record)."""
    k = key.encode()
    pattern = re.escape(bytes([0x12, len(k)]) + k + b"\x82\x01") + rb"(.)"
    out = []
    for m in re.finditer(pattern, record_log, re.S):
        n = m.group(1)[0]
        out.append(json.loads(record_log[m.end():m.end() + n]))
    return list(dict.fromkeys(out))


def test_wandb_missing_is_a_one_line_error(tmp_path, monkeypatch):
    for name in ("model", "data"):
        (tmp_path / name).mkdir()
    cfg = config_from_dict({"model": {"path": str(tmp_path / "model")}, "data": {"path": str(tmp_path / "data")},
                            "log": {"wandb": {"project": "p"}}})
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"log.wandb=.*'project': 'p'.*not installed \(pip install wandb"):
        loop.check_inputs(cfg)
