"""Training with the cache and the outputs on `gs://` (the tests' Cloud Storage emulator), against the same run
on local disk: the same LoRA file, metrics, validation grids and TensorBoard events; a resume from the
bucket; a kill -9 in the middle of a checkpoint write to the bucket.

Every run is `train/train_lora.py` in a subprocess (the command a pod runs; it finds the emulator through the
standard variables it inherits), on a tiny random repo (the validation grid needs its text encoder and VAE).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qwen_edit_jax as q
from qwen_edit_jax.cache_format import MANIFEST, write_cache
from qwen_edit_jax.loading import save_transformer
from qwen_edit_jax.models.dit import init_transformer
from qwen_edit_jax.testing.latent import LatentDemo, demo_samples
from qwen_edit_jax.testing.repo import write_tiny_edit_repo
from qwen_edit_jax.training.config import ConfigError, config_from_dict
from qwen_edit_jax.training.loop import train
from qwen_edit_jax.utils import storage
from gcs_emulator import objects

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"step_time", "samples_per_s"}  # metrics that measure this machine, not the training


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gcs_bucket):
    """A tiny repo, its cache on local disk and in the bucket, a validation image, and the run's config."""
    d = tmp_path_factory.mktemp("gcs_training")
    repo = write_tiny_edit_repo(d / "repo")
    save_transformer(init_transformer(q.preset("tiny"), seed=3), repo / "transformer")
    demo = LatentDemo(num_samples=8, latent_sizes=((8, 8),), num_edits=2, prompt_lengths=(4, 10))
    cache = str(write_cache(d / "cache", demo_samples(demo, 16, q.preset("tiny").joint_attention_dim)))
    prefix = f"{gcs_bucket}/training-{uuid.uuid4().hex[:8]}"
    storage.upload_tree(cache, f"{prefix}/cache", marker=MANIFEST)
    image = str(d / "in.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    cfg = {"model": {"path": str(repo / "transformer"), "param_dtype": "float32", "dtype": "float32"},
           "lora": {"rank": 4}, "data": {"path": cache, "batch_size": 2, "text_buckets": [16]},
           "optim": {"learning_rate": 5e-2, "warmup_steps": 1},
           "train": {"max_steps": 4, "save_every": 2, "keep_checkpoints": 2, "progress": False},
           "validation": {"every": 4, "resolution": 64, "num_inference_steps": 2,
                          "prompts": [{"prompt": "make the square red", "images": [image]}]}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return {"dir": d, "cfg": str(d / "cfg.yaml"), "cache": cache, "prefix": prefix}


def _train(setup, out: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train/train_lora.py", "--config", setup["cfg"], "--output-dir", out,
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(proc: subprocess.Popen) -> str:
    """Wait for a run that must succeed; returns its stderr."""
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return err


@pytest.fixture(scope="module")
def runs(setup):
    """The same 4 steps twice, at once: local cache → local folder, and cache in the bucket → bucket."""
    local, remote = str(setup["dir"] / "local_run"), f"{setup['prefix']}/run"
    procs = [_train(setup, local), _train(setup, remote, f"data.path={setup['prefix']}/cache")]
    for p in procs:
        _done(p)
    return local, remote


def _metrics(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in text.splitlines()]


def _names(prefix: str) -> list[str]:
    """Object names under a prefix, relative to it (listed by the emulator: no client cache)."""
    bucket_prefix = prefix.removeprefix("gs://") + "/"
    return [n.removeprefix(bucket_prefix) for n in objects(prefix + "/")]


@pytest.mark.slow
def test_a_run_on_gs_equals_the_local_run_and_resumes(setup, runs, tmp_path):
    """LoRA file byte-equal, the same metrics, grids and TensorBoard scalars/images; checkpoints committed in
    the bucket; the same command with more steps resumes from the bucket."""
    local, remote = runs
    names = _names(remote)
    assert storage.read_bytes(f"{remote}/lora_diffusers.safetensors") == open(f"{local}/lora_diffusers.safetensors",
                                                                                "rb").read()
    got = _metrics(storage.read_text(f"{remote}/metrics.jsonl"))
    assert got == _metrics(open(f"{local}/metrics.jsonl").read())
    assert [r["step"] for r in got if "loss" in r] == [1, 2, 3, 4]
    run = json.loads(storage.read_text(f"{remote}/run.json"))
    assert run["data"]["path"] == f"{setup['prefix']}/cache"
    assert run["run_info"]["dataset"]["fingerprint"] == json.load(open(f"{local}/run.json"))["run_info"]["dataset"][
        "fingerprint"]
    for step in (0, 4):  # validation grids: before training and at the end
        png = f"validation/step_{step:06d}.png"
        assert png in names and storage.read_bytes(f"{remote}/{png}") == open(f"{local}/{png}", "rb").read()
    for step in (2, 4):  # keep_checkpoints 2; each step committed by its marker
        assert f"checkpoints/{step}/commit_success.txt" in names, names
    events = [n for n in names if n.startswith("tensorboard/events.out.tfevents")]
    assert len(events) == 1, names
    tb = tmp_path / "tensorboard"
    storage.download_file(f"{remote}/{events[0]}", tb / "events.out.tfevents.remote")
    ea = EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in got if "loss" in r]
    assert [e.step for e in ea.Images("validation/grid")] == [0, 4]

    err = _done(_train(setup, remote, f"data.path={setup['prefix']}/cache", "--max-steps", "6",
                       "validation.every=0"))
    assert f"resuming from {remote}/checkpoints/4 (step 4)" in err, err[-3000:]
    assert [r["step"] for r in _metrics(storage.read_text(f"{remote}/metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
    names = _names(remote)
    assert [n for n in names if n.endswith("/commit_success.txt") and n.count("/") == 2] == [
        "checkpoints/4/commit_success.txt", "checkpoints/6/commit_success.txt"]
    assert storage.read_bytes(f"{remote}/lora_diffusers.safetensors") != open(f"{local}/lora_diffusers.safetensors",
                                                                                "rb").read()


def _steps(names: list[str]) -> tuple[set[int], set[int]]:
    """(committed, started) checkpoint steps among object names relative to the run."""
    started = {int(m.group(1)) for n in names if (m := re.match(r"checkpoints/(\d+)/", n))}
    committed = {s for s in started if f"checkpoints/{s}/commit_success.txt" in names}
    return committed, started


@pytest.mark.slow
def test_kill_9_during_a_bucket_checkpoint_write_resumes_from_the_previous_one(setup, runs):
    """SIGKILL while a step's objects are being written to the bucket (no commit marker yet): that step is
    never taken for a checkpoint; the same command resumes from the newest committed one and ends with the
    LoRA file of the uninterrupted local run, byte for byte."""
    local, _ = runs
    out = f"{setup['prefix']}/killed"
    args = (f"data.path={setup['prefix']}/cache", "--save-every", "1", "validation.every=0")
    proc = _train(setup, out, *args)
    committed = started = set()
    while proc.poll() is None:
        committed, started = _steps(_names(out))
        if committed and started - committed:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the run ended before a save could be caught in progress"
    partial = max(started - committed)
    after_committed, _ = _steps(_names(out))
    assert partial not in after_committed  # the kill left that step half-written
    previous = max(after_committed)

    err = _done(_train(setup, out, *args))
    assert f"resuming from {out}/checkpoints/{previous} (step {previous})" in err, err[-3000:]
    assert storage.read_bytes(f"{out}/lora_diffusers.safetensors") == open(f"{local}/lora_diffusers.safetensors",
                                                                             "rb").read()
    assert [r["step"] for r in _metrics(storage.read_text(f"{out}/metrics.jsonl"))] == [1, 2, 3, 4]
    committed, started = _steps(_names(out))
    assert committed == started == {3, 4}  # the half-written step was written again, and committed


def test_other_url_schemes_and_missing_gs_inputs_are_one_line_errors(tmp_path, gcs_dir):
    """Checked before anything is written: a missing cache in the bucket names the key; `s3://` (or any
    scheme but gs://) is refused for inputs and for the output dir."""
    cfg = config_from_dict({"model": {"path": str(tmp_path)}, "data": {"path": f"{gcs_dir}/nope/"}})
    with pytest.raises(ConfigError, match="^" + re.escape(f"data.path: {gcs_dir}/nope/ does not exist") + "$"):
        train(cfg, f"{gcs_dir}/run", log=lambda m: None)
    assert objects(gcs_dir + "/") == []
    s3 = config_from_dict({"model": {"path": str(tmp_path)}, "data": {"path": "s3://b/cache"}})
    with pytest.raises(ConfigError, match="^data.path s3://b/cache: only local paths and gs:// URLs are supported$"):
        train(s3, tmp_path / "run", log=lambda m: None)
    with pytest.raises(ValueError, match="^output_dir s3://b/run: only local paths and gs:// URLs are supported$"):
        train(cfg, "s3://b/run", log=lambda m: None)
    assert os.listdir(tmp_path) == []
