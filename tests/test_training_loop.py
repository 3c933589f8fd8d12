"""The training run end to end: outputs, export parity with diffusers, NaN stop, kill-and-resume, demo loss.

All runs use a tiny random diffusers checkpoint and a synthetic cached edit dataset with one
image layout (one compiled program), so each run is a few seconds plus one compile.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

import qwen_edit_jax as q
from qwen_edit_jax.parallel.preemption import EXIT_PREEMPTED
from qwen_edit_jax.training.checkpoint import TrainCheckpointer
from qwen_edit_jax.testing.latent import CACHE_DIR, MODEL_DIR, LatentDemo, demo_samples, write_latent_demo
from qwen_edit_jax.training.config import ConfigError, config_from_dict, load_config
from qwen_edit_jax.errors import CheckpointError
from qwen_edit_jax.cache_format import DataError, write_cache
from qwen_edit_jax.training.loop import NonFiniteLossError, train
from qwen_edit_jax.training.step import make_schedule, split_lora
from tests.compare import assert_close, assert_differs
from tests.torch_reference import make_torch_model, save_torch_model, torch_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = q.preset("tiny")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    tm = make_torch_model(TINY, seed=11)
    base = save_torch_model(tm, d / "base")
    demo = LatentDemo(num_samples=24, latent_sizes=((8, 8),), num_edits=3, prompt_lengths=(4, 10))
    data = write_cache(d / "cache", demo_samples(demo, 16, TINY.joint_attention_dim))
    return tm, str(base), str(data)


def _cfg_dict(assets, **sections):
    _, base, data = assets
    d = {
        "model": {"path": base, "param_dtype": "float32", "dtype": "float32", "remat": "none"},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"path": data, "batch_size": 2, "text_buckets": [16], "prefetch": 1},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 6, "save_every": 2, "keep_checkpoints": 2, "progress": False},
    }
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return d


def _read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_outputs_and_export_match_diffusers(assets, tmp_path):
    """run.json / metrics.jsonl / checkpoints / LoRA file; the file in diffusers = our trained model."""
    tm, base, _ = assets
    cfg = config_from_dict(_cfg_dict(assets, train={"max_steps": 5}))
    out = tmp_path / "run"
    res = train(cfg, out, log=lambda m: None)
    assert res.final_step == 5 and res.resumed_from is None
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["path"] == base and run["run_info"]["base_model"]["path"] == base
    assert run["run_info"]["base_model"]["config"]["num_layers"] == TINY.num_layers
    assert config_from_dict(run) == cfg.replace()  # run.json reads back as the same (resolved) config
    m = _read_metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5]
    for r in m:
        assert {"loss", "lr", "grad_norm", "step_time", "samples_per_s"} <= set(r) and np.isfinite(r["loss"])
    assert m[0]["lr"] == 0.0 and m[2]["lr"] == pytest.approx(3e-3)  # warm-up then constant
    ck = TrainCheckpointer(out / "checkpoints")
    assert ck.all_steps() == [4, 5]  # keep 2
    ck.close()

    lora_path = out / "lora_diffusers.safetensors"
    assert res.lora_files == [str(lora_path)]
    # ours: base + trained adapters
    model = q.load_transformer(base, options=cfg.model_options())
    graphdef, _, base_state = split_lora(model)
    trained = nnx.merge(graphdef, res.lora_params, base_state)
    rng = np.random.default_rng(0)
    shapes = [(1, 4, 4), (1, 4, 4)]
    hidden = rng.standard_normal((1, 32, 64), dtype=np.float32)
    enc = rng.standard_normal((1, 7, TINY.joint_attention_dim), dtype=np.float32)
    sigma = np.array([0.6], np.float32)
    ours = np.asarray(trained(hidden_states=hidden, encoder_hidden_states=enc, timestep=sigma, img_shapes=[shapes]))
    plain = np.asarray(model(hidden_states=hidden, encoder_hidden_states=enc, timestep=sigma, img_shapes=[shapes]))
    assert_differs(ours, plain, 1e-3, "outputs and export match diffusers")  # training really changed the model
    # diffusers + PEFT, loading the exported file the standard way
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    sd, meta = QwenImageLoraLoaderMixin.lora_state_dict(str(lora_path), return_lora_metadata=True)
    assert any(".attn.to_q.lora_A.weight" in k for k in sd) and not any("to_qkv" in k for k in sd)
    t = copy.deepcopy(tm)
    t.load_lora_adapter(sd, prefix="transformer", adapter_name="trained", metadata=meta)
    ref = torch_forward(t, hidden, enc, None, sigma, [shapes])
    assert_close(ours, ref, 8e-6, "trained LoRA in diffusers vs ours")  # measured 7.2e-7 (2026-12-07), ≈ 10×


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    train(config_from_dict(_cfg_dict(assets, train={"max_steps": 2, "save_every": 1})), out, log=lambda m: None)
    ck = TrainCheckpointer(out / "checkpoints")
    assert ck.latest_step() == 2
    like = jax.tree.map(lambda x: x, _restore(ck, assets))
    ck.close()
    # resume the same run with an absurd learning rate: the weights blow up, the loss turns NaN/Inf
    bad = config_from_dict(_cfg_dict(assets, optim={"learning_rate": 1e30, "max_grad_norm": None},
                                     train={"max_steps": 8, "save_every": 1}))
    with pytest.raises(NonFiniteLossError, match=r"step \d: .*not finite.*Last good checkpoint: .*checkpoints/2 "):
        train(bad, out, log=lambda m: None)
    ck = TrainCheckpointer(out / "checkpoints")
    assert ck.latest_step() == 2  # nothing from the diverged steps was saved
    again = _restore(ck, assets)
    jax.tree.map(np.testing.assert_array_equal, again, like)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(again))
    ck.close()


def _restore(ck, assets):
    cfg = config_from_dict(_cfg_dict(assets))
    model = q.load_transformer(assets[1], options=cfg.model_options())
    _, params, _ = split_lora(model)
    from qwen_edit_jax.training.step import make_optimizer

    tx, _ = make_optimizer(cfg.optim, 10)
    p, _, _ = ck.restore(ck.latest_step(), params, tx.init(params))
    return jax.tree.map(np.asarray, p)


def test_resume_with_a_different_lora_shape_is_a_clear_error(assets, tmp_path):
    out = tmp_path / "run"
    train(config_from_dict(_cfg_dict(assets, train={"max_steps": 2})), out, log=lambda m: None)
    with pytest.raises(ConfigError, match=r"cannot restore this checkpoint.*lora\.rank"):
        train(config_from_dict(_cfg_dict(assets, lora={"rank": 8}, train={"max_steps": 4})), out, log=lambda m: None)


# ---- kill or preempt at chosen moments (also mid-save) → resume → bit-identical ---------------------------
KILL_WORKER = os.path.join(ROOT, "tests", "train_kill_worker.py")
PREEMPTED_LINE = "preempted at step {}; checkpoint saved; run the same command to resume"


def _cli(cfg_path, out, *args, kill_at=None, env=None):
    """`train/train_lora.py` on `cfg_path` → `out` (+ `args`); `kill_at`: a kill point of train_kill_worker.py."""
    cmd = [KILL_WORKER, kill_at] if kill_at else ["train/train_lora.py"]
    return subprocess.Popen([sys.executable, *cmd, "--config", str(cfg_path), "--output-dir", str(out), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(out):
    """Complete lines of out/metrics.jsonl (a line cut by a kill has no newline)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.endswith("\n"))


def _steps(out):
    """(complete checkpoint steps, steps with an unfinished Orbax save: a `<step>.orbax-checkpoint-tmp-*` folder)."""
    names = os.listdir(os.path.join(out, "checkpoints"))
    return (sorted(int(n) for n in names if n.isdigit()),
            sorted(int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n))


def _wait_until(proc, what, ready, timeout=600):
    """Poll `ready()` every 2 ms while `proc` runs (it must not end first)."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.002)


def _ended(proc, status):
    """Wait for a process that must end with `status` (negative: by that signal); returns its stderr."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == status, (proc.returncode, err[-3000:])
    return err


def _mixed_caches(folder):
    """The kill test's data: the fixture's 24 samples, and 4 more with grey loss masks (repeats 2), both with
    the empty prompt cached as their negative prompt (caption dropout reads it); one 8x8 layout."""
    rng = np.random.default_rng(7)
    paths = []
    for name, demo, masks in (("a", LatentDemo(num_samples=24, latent_sizes=((8, 8),), num_edits=3,
                                               prompt_lengths=(4, 10)), False),
                              ("b", LatentDemo(num_samples=4, latent_sizes=((8, 8),), num_edits=2,
                                               prompt_lengths=(4, 10), data_seed=1), True)):
        samples = [dataclasses.replace(s, negative_prompt_embeds=rng.standard_normal((3, TINY.joint_attention_dim),
                                                                                     ).astype(np.float32),
                                       negative_prompt_mask=np.ones(3, bool),
                                       mask=rng.uniform(0, 1, (8, 8)).astype(np.float32) if masks else None)
                   for s in demo_samples(demo, 16, TINY.joint_attention_dim)]
        paths.append(str(write_cache(folder / name, samples, metadata={"negative_prompt": " "})))
    return paths


@pytest.mark.slow
def test_kill_or_preempt_anywhere_and_resume_is_bit_identical(assets, tmp_path):
    """One run interrupted six ways, each rerun of the same command resuming, and the end bit-identical to an
    uninterrupted run: the same LoRA file, the same loss at every step, no cut or duplicated metrics line,
    no unfinished save left behind. The interruptions: (1) SIGKILL while writing the first step's metrics
    line, before any checkpoint; (2) SIGTERM (a preemption notice): the step in progress is finished,
    checkpointed, nothing exported, exit status 75; (3) a second SIGTERM in the middle of that preemption
    save: the process ends at once and the previous complete checkpoint is the one resumed; (4) SIGKILL from
    outside in the middle of an asynchronous checkpoint save, with a complete checkpoint two steps into the
    second epoch and metrics lines past it; (5) SIGKILL after the last checkpoint is complete but before the
    LoRA export. The run mixes two caches (repeats 1 and 2), drops captions (0.3) and weighs the loss by
    masks, all of which resume."""
    steps = 22  # 24 + 2x4 samples, batch 2 (the step the other tests compile): 16 steps per epoch
    a, b = _mixed_caches(tmp_path)
    d = _cfg_dict(assets, train={"max_steps": steps, "save_every": 2, "keep_checkpoints": 2, "log_every": 1},
                  data={"prefetch": 2, "path": "", "datasets": [{"path": a}, {"path": b, "repeats": 2}],
                        "caption_dropout": 0.3}, objective={"mask_min_weight": 0.1})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "interrupted"
    ref = _cli(cfg_path, ref_out)  # runs alongside the interrupted runs (they share nothing)
    resuming = f"resuming from {out / 'checkpoints'}/{{}} (step {{}})"

    # 1) during the first step: its metrics line cut in half, no checkpoint yet
    _ended(_cli(cfg_path, out, kill_at="metrics:1"), -signal.SIGKILL)
    assert _steps(out) == ([], [])
    assert (out / "metrics.jsonl").read_text().startswith('{"step": 1') and _lines(out) == 0  # a cut line
    # 2) SIGTERM once step 3 is logged: the step in progress is finished and saved, then exit 75
    p = _cli(cfg_path, out)
    _wait_until(p, "step 3's metrics", lambda: _lines(out) >= 3)
    p.send_signal(signal.SIGTERM)
    err = _ended(p, EXIT_PREEMPTED)
    done = _steps(out)[0][-1]
    assert 3 <= done < steps and PREEMPTED_LINE.format(done) in err and "Traceback" not in err, err[-3000:]
    assert _steps(out) == ([s for s in (done - 2 + done % 2, done) if s >= 2], [])  # kept: last regular, preempted
    assert _lines(out) == done and not (out / "lora_diffusers.safetensors").exists()
    # 3) SIGTERM again (no regular saves now), and once more while the preemption save is unfinished: the
    # process ends at once; the unfinished save is ignored on resume
    p = _cli(cfg_path, out, "--save-every", "100")
    _wait_until(p, f"step {done + 2}'s metrics", lambda: _lines(out) >= done + 2)
    p.send_signal(signal.SIGTERM)
    _wait_until(p, "the preemption save", lambda: _steps(out)[1])
    p.send_signal(signal.SIGTERM)
    err = _ended(p, -signal.SIGTERM)
    assert resuming.format(done, done) in err, err[-3000:]
    complete, unfinished = _steps(out)
    assert complete[-1] == done and len(unfinished) == 1 and unfinished[0] > done + 2, (complete, unfinished)
    # 4) SIGKILL from outside while the asynchronous save of step 20 is unfinished
    p = _cli(cfg_path, out)
    _wait_until(p, "the save of step 20", lambda: 20 in _steps(out)[1])
    p.kill()
    err = _ended(p, -signal.SIGKILL)
    assert resuming.format(done, done) in err, err[-3000:]
    complete, unfinished = _steps(out)
    assert 18 in complete and 20 not in complete and unfinished == [20], (complete, unfinished)
    assert _lines(out) >= 20  # metrics of steps 19 and 20 are past the last complete checkpoint
    # 5) after the last checkpoint (step 22) is complete, before the LoRA file is written
    err = _ended(_cli(cfg_path, out, kill_at="export"), -signal.SIGKILL)
    assert resuming.format(18, 18) in err, err[-3000:]  # two steps into epoch 2
    assert not (out / "lora_diffusers.safetensors").exists()
    # the rerun finds the run finished and only exports
    p = _cli(cfg_path, out)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    assert resuming.format(steps, steps) in stderr and f"already at step {steps}" in stdout

    stdout, stderr = ref.communicate(timeout=600)
    assert ref.returncode == 0, stderr[-3000:]
    with open(ref_out / "lora_diffusers.safetensors", "rb") as f1, open(out / "lora_diffusers.safetensors", "rb") as f2:
        assert f1.read() == f2.read()  # bit-identical LoRA file
    ref_m, got_m = _read_metrics(ref_out), _read_metrics(out)
    assert [r["step"] for r in got_m] == list(range(1, steps + 1))  # no cut, dropped or repeated line
    assert [r["loss"] for r in got_m] == [r["loss"] for r in ref_m]  # the same losses, step by step
    assert _steps(out)[1] == []  # interrupted saves cleaned up
    info = json.loads((out / "run.json").read_text())["run_info"]["dataset"]
    assert [(c["path"], c["repeats"], c["num_samples"], c["masks"]) for c in info["caches"]] == [(a, 1, 24, 0),
                                                                                              (b, 2, 4, 4)]
    assert info["steps_per_epoch"] == 16


@pytest.mark.slow
def test_demo_loss_falls(tmp_path):
    """The shipped demo config on the demo's inputs (one image bucket), shortened: loss of the last 20
    steps well below the first 20."""
    folder = write_latent_demo(tmp_path / "latent", LatentDemo(latent_sizes=((16, 16),)))
    cfg = load_config(os.path.join(ROOT, "train", "configs", "latent_demo.yaml"), [
        f"model.path={folder / MODEL_DIR}", f"data.path={folder / CACHE_DIR}", "train.max_steps=120",
        "train.save_every=120", "train.progress=false", "data.text_buckets=[16]"])
    res = train(cfg, tmp_path / "run", log=lambda m: None)
    losses = [r["loss"] for r in _read_metrics(tmp_path / "run")]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.75 * first, (first, last)
    assert os.path.exists(res.lora_files[0])


@pytest.mark.slow
def test_validation_hook_and_init_from(assets, tmp_path):
    """`validation.every` logs sampled-latent distances; `lora.init_from` starts from a LoRA file."""
    first = train(config_from_dict(_cfg_dict(assets, train={"max_steps": 2, "save_every": 2},
                                             validation={"every": 2, "samples": [0, 1], "num_inference_steps": 2})),
                  tmp_path / "a", log=lambda m: None)
    m = _read_metrics(tmp_path / "a")
    val = [r for r in m if "validation_distance" in r]
    assert [r["step"] for r in val] == [0, 2] and all(np.isfinite(r["validation_distance"]) for r in val)
    assert len(val[0]["validation_per_sample"]) == 2 and val[0]["validation_distance"] != val[1]["validation_distance"]
    # a second run initialised from the first run's export, barely trained: the same adapters come out
    src = first.lora_files[0]
    second = train(config_from_dict(_cfg_dict(assets, lora={"init_from": src}, optim={"learning_rate": 1e-12},
                                              train={"max_steps": 1})), tmp_path / "b", log=lambda m: None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9),
                 second.lora_params, first.lora_params)


# The whole run on a mesh equals one device: tests/test_sharding_multihost.py::test_training_on_a_mesh_matches_one_device
# (it shares that module's (2, 2, 2)-mesh run).


def test_bf16_compute_on_cpu_is_a_clear_error(assets, tmp_path):
    """XLA:CPU cannot differentiate bf16×bf16→fp32 matmuls: say so before loading anything."""
    cfg = config_from_dict(_cfg_dict(assets, model={"dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match=r"model.dtype='bfloat16'.*train with model.dtype=float32"):
        train(cfg, tmp_path / "run", log=lambda m: None)


# ---- inputs and outputs: the trainer reads what exists and makes nothing else -------------------------------
@pytest.mark.parametrize("key", ["model.path", "data.path"])
def test_a_missing_input_is_a_one_line_error_naming_the_key(assets, tmp_path, key):
    """A missing input stops the run before any work with one line naming the key and the path as written;
    nothing is created, neither at that path nor the output folder."""
    typo = tmp_path / "data" / "my-real-modle"
    cfg = config_from_dict(_cfg_dict(assets, **{key.split(".")[0]: {"path": str(typo)}}))
    with pytest.raises(ConfigError, match="^" + re.escape(f"{key}: {typo} does not exist") + "$"):
        train(cfg, tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_a_missing_cache_of_data_datasets_names_its_entry(assets, tmp_path):
    """Every cache of `data.datasets` is checked before any work; the error names the entry."""
    typo = tmp_path / "nope"
    d = _cfg_dict(assets, data={"path": "", "datasets": [{"path": assets[2]}, {"path": str(typo), "repeats": 2}]})
    with pytest.raises(ConfigError, match="^" + re.escape(f"data.datasets[1].path: {typo} does not exist") + "$"):
        train(config_from_dict(d), tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_resume_from_a_run_json_older_than_a_key_counts_it_as_its_default():
    """A run.json written before `data.datasets` / `data.caption_dropout` existed reads as their defaults: no
    'changed config' warning on resume, unless the new config sets another value."""
    from qwen_edit_jax.training.loop import config_changes

    new = config_from_dict({"model": {"path": "m"}, "data": {"path": "d"}}).to_dict()
    old = copy.deepcopy(new)
    del old["data"]["datasets"], old["data"]["caption_dropout"], old["objective"]["mask_min_weight"]
    assert config_changes(old, new) == []
    new["data"]["caption_dropout"] = 0.1
    assert config_changes(old, new) == ["data.caption_dropout: 0.0 -> 0.1"]


def test_the_latent_demo_without_its_inputs_says_how_to_make_them(tmp_path):
    """train_lora.py on the shipped latent demo config, run where demo_data/ is missing: exit 2 and one line
    naming the key and the relative path, with the command that writes the demo's inputs."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train", "train_lora.py"), "--config",
                        os.path.join(ROOT, "train", "configs", "latent_demo.yaml"), "--output-dir", "run"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        "error: model.path: demo_data/latent/tiny-dit does not exist "
        "(make the demo's inputs with: python -m qwen_edit_jax.demo --out demo_data)"], r.stderr
    assert os.listdir(tmp_path) == []
    cfg = load_config(os.path.join(ROOT, "train", "configs", "latent_demo.yaml"))
    assert not hasattr(cfg, "demo")  # the trainer's config has no section that makes inputs


def test_model_path_on_an_existing_file_is_not_overwritten(assets, tmp_path):
    """`model.path` naming an existing file (here a LoRA) is read as it is and refused; nothing is written onto it."""
    lora = tmp_path / "some_lora.safetensors"
    from safetensors.numpy import save_file

    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, 128), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((128, 2), np.float32)}, str(lora))
    before = lora.read_bytes()
    cfg = config_from_dict(_cfg_dict(assets, model={"path": str(lora)}))
    with pytest.raises(CheckpointError, match="a LoRA, not a base model"):
        train(cfg, tmp_path / "run", log=lambda m: None)
    assert lora.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["some_lora.safetensors"]


def test_output_dir_that_is_a_file_or_under_one(assets, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    cfg = config_from_dict(_cfg_dict(assets))
    with pytest.raises(NotADirectoryError, match="^" + re.escape(f"output_dir {f}: is a file, not a folder")):
        train(cfg, f, log=lambda m: None)
    with pytest.raises(NotADirectoryError, match="^" + re.escape(f"output_dir {f}/run: {f} is a file, so no folder")):
        train(cfg, f / "run", log=lambda m: None)
    cases = [(f, f"--output-dir {f}: is a file"), (f / "run", f"--output-dir {f}/run: {f} is a file")]
    procs = [subprocess.Popen([sys.executable, "train/train_lora.py", "--config", str(tmp_path / "none.yaml"),
                               "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for out, _ in cases]  # both at once
    for p, (_, msg) in zip(procs, cases):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and err.startswith(f"error: {msg}"), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_failed_run_leaves_no_folder_it_created(assets, tmp_path):
    bad_cache = tmp_path / "bad_cache"
    bad_cache.mkdir()
    (bad_cache / "manifest.json").write_text("{not json")
    cfg = config_from_dict(_cfg_dict(assets, data={"path": str(bad_cache)}))
    with pytest.raises(DataError, match="corrupt manifest"):
        train(cfg, tmp_path / "new" / "run", log=lambda m: None)
    assert not (tmp_path / "new" / "run").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        train(cfg, existing, log=lambda m: None)
    assert (existing / "notes.txt").read_text() == "mine"  # a folder that existed before is never removed


@pytest.mark.slow
def test_resume_with_more_steps_keeps_the_lr_schedule(assets, tmp_path):
    """A new --max-steps continues the recorded schedule (no LR jump); optim.schedule_steps re-stretches it, loudly."""
    optim = {"learning_rate": 2e-3, "warmup_steps": 1, "schedule": "cosine", "min_lr_ratio": 0.1}
    out = tmp_path / "run"
    first = train(config_from_dict(_cfg_dict(assets, optim=optim, train={"max_steps": 4, "save_every": 4})), out,
                  log=lambda m: None)
    assert first.schedule_steps == 4
    logs = []
    res = train(config_from_dict(_cfg_dict(assets, optim=optim, train={"max_steps": 6, "save_every": 2})), out,
                log=logs.append)
    assert res.schedule_steps == 4
    lr = {r["step"]: r["lr"] for r in _read_metrics(out)}
    sched4 = make_schedule(config_from_dict(_cfg_dict(assets, optim=optim)).optim, 4)
    assert lr[4] == pytest.approx(float(sched4(3)))
    assert lr[5] == pytest.approx(float(sched4(4))) == pytest.approx(2e-4)  # the recorded curve's final value
    assert lr[6] == pytest.approx(2e-4)
    assert lr[5] <= lr[4]  # no jump up (re-stretched to 6 steps it would be 3.5e-4 > 2.7e-4)
    text = "\n".join(logs)
    assert "train.max_steps: 4 -> 6" in text and "kept at its recorded length of 4 steps" in text
    assert "optim.schedule_steps=6" in text  # says how to stretch instead
    assert json.loads((out / "run.json").read_text())["run_info"]["schedule_steps"] == 4
    # asked for explicitly: re-stretched, and the log says what the LR does
    logs.clear()
    res = train(config_from_dict(_cfg_dict(assets, optim={**optim, "schedule_steps": 10},
                                           train={"max_steps": 7, "save_every": 7})), out, log=logs.append)
    assert res.schedule_steps == 10
    sched10 = make_schedule(config_from_dict(_cfg_dict(assets, optim=optim)).optim, 10)
    assert _read_metrics(out)[-1]["lr"] == pytest.approx(float(sched10(6)))
    assert any(f"re-stretched from 4 to 10 steps (optim.schedule_steps); the LR at step 7 changes from "
               f"{float(sched4(6)):.3g} to {float(sched10(6)):.3g}" in m for m in logs), logs


@pytest.mark.slow
def test_cli_overrides_anywhere_short_run_summary_and_quiet_cpu(assets, tmp_path):
    """`key=value` before and after options; a 2-step run reports two different losses; the compile is
    announced; no libtpu probe noise on a machine without accelerators (JAX_PLATFORMS unset)."""
    d = _cfg_dict(assets)
    data = d.pop("data")["path"]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "train/train_lora.py", "--config", str(cfg_path), f"data.path={data}",
                        "--max-steps", "2", "train.progress=false", "--output-dir", str(tmp_path / "run"),
                        "train.save_every=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [m["loss"] for m in _read_metrics(tmp_path / "run")]
    assert f"loss {losses[0]:.4f} (first step) -> {losses[1]:.4f} (last step)" in r.stdout, r.stdout
    assert "compiling the training step" in r.stderr
    from qwen_edit_jax.utils.accelerators import accelerator_nodes

    if not accelerator_nodes():
        assert "TPU" not in r.stderr and "libtpu" not in r.stderr and "InitGoogle" not in r.stderr, r.stderr
