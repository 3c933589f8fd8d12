"""Validation during training: before/after PNG grids through the pipeline, TensorBoard events, bad inputs.

One tiny random repo (text encoder, VAE, processor, a `tiny` DiT) and a synthetic cache of 8×8
latents; the grids' "before" / "after" cells are compared with the JAX pipeline run on its own
(without / with the exported LoRA file), and the TensorBoard events are read back with
TensorBoard's own reader.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qwen_edit_jax as q
from qwen_edit_jax.loading import save_transformer
from qwen_edit_jax.models.dit import init_transformer
from qwen_edit_jax.testing.latent import LatentDemo, demo_samples
from qwen_edit_jax.testing.repo import write_tiny_edit_repo
from qwen_edit_jax.training.config import ConfigError, config_from_dict
from qwen_edit_jax.cache_format import write_cache
from qwen_edit_jax.training.loop import train
from qwen_edit_jax.training.run_log import RunLog
from qwen_edit_jax.training.validation import CELL_HEIGHT, ValidationImages

SIZE = 64  # validation images (and outputs) are 64×64: 4×4 latent tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("validation")
    repo = write_tiny_edit_repo(d / "repo")
    save_transformer(init_transformer(q.preset("tiny"), seed=3), repo / "transformer")
    demo = LatentDemo(num_samples=8, latent_sizes=((8, 8),), num_edits=2, prompt_lengths=(4, 10))
    cache = write_cache(d / "cache", demo_samples(demo, 16, q.preset("tiny").joint_attention_dim))
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate(((SIZE, SIZE), (SIZE, 2 * SIZE))):
        path = d / f"in{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return str(repo), str(cache), images


PROMPTS = ("make the square red", "mirror the image")


def _cfg(setup, **sections):
    repo, cache, images = setup
    d = {"model": {"path": os.path.join(repo, "transformer"), "param_dtype": "float32", "dtype": "float32"},
         "lora": {"rank": 4}, "data": {"path": cache, "batch_size": 2, "text_buckets": [16]},
         "optim": {"learning_rate": 5e-2},
         "train": {"max_steps": 4, "save_every": 2, "progress": False},
         "validation": {"every": 2, "resolution": SIZE, "num_inference_steps": 2,
                        "prompts": [{"prompt": PROMPTS[0], "images": [images[0]]},
                                    {"prompt": PROMPTS[1], "images": [images[1], images[0]],
                                     "negative_prompt": "blurry"}]}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return config_from_dict(d)


def _cell(grid: np.ndarray, row: int, col: int, widths: list[list[int]]) -> np.ndarray:
    """The image cell (row, col) of an `edit_grid` (layout constants of training/validation.py)."""
    pad, text = 4, 14
    y = text + pad + row * (2 * text + CELL_HEIGHT + 2 * pad) + 2 * text
    x = pad + sum(w + pad for w in widths[row][:col])
    return grid[y:y + CELL_HEIGHT, x:x + widths[row][col]]


def _pipeline(repo, lora=None) -> q.QwenImageEditPipeline:
    pipe = q.QwenImageEditPipeline.from_pretrained(repo, dtype=jnp.float32, lora=lora)
    pipe.vae_image_area = SIZE * SIZE
    return pipe


def _pipeline_image(pipe, images, prompt, negative, seed) -> np.ndarray:
    """The pipeline on its own, as a user would call it, enlarged to the grid's cell height."""
    out = pipe(image=[Image.open(p) for p in images], prompt=prompt, negative_prompt=negative, true_cfg_scale=4.0,
               num_inference_steps=2, seed=seed, output_type="pil").images[0]
    return np.asarray(out.resize((out.width * CELL_HEIGHT // out.height, CELL_HEIGHT), Image.NEAREST))


def _events(run: str) -> EventAccumulator:
    ea = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


@pytest.mark.slow
def test_grids_equal_the_pipeline_and_tensorboard_reads_back(setup, tmp_path):
    """Grids at steps 0, 2, 4: "before" = the pipeline without LoRA, "after" = with the exported LoRA
    file; TensorBoard holds the same scalars as metrics.jsonl and the same grids as the PNGs; a resume
    after a lost checkpoint leaves every step once in both logs."""
    repo, _, images = setup
    run = str(tmp_path / "run")
    result = train(_cfg(setup), run, log=lambda m: None)
    files = sorted(os.listdir(os.path.join(run, "validation")))
    assert files == ["step_000000.png", "step_000002.png", "step_000004.png"]
    grids = {s: np.asarray(Image.open(os.path.join(run, "validation", f"step_{s:06d}.png")).convert("RGB"))
             for s in (0, 2, 4)}
    # columns: the inputs (64×64, then 64×128 → 256 and 512 wide cells), before, after (output follows the last image)
    widths = [[CELL_HEIGHT] * 3, [2 * CELL_HEIGHT, CELL_HEIGHT, CELL_HEIGHT, CELL_HEIGHT]]
    assert grids[0].shape[1] < grids[2].shape[1] == grids[4].shape[1]  # step 0 has no "after" column
    base_pipe, lora_pipe = _pipeline(repo), _pipeline(repo, lora=result.lora_files[0])
    for row, (prompt, negative, seed) in enumerate(((PROMPTS[0], None, 0), (PROMPTS[1], "blurry", 1))):
        n_in = row + 1
        row_images = [images[0]] if row == 0 else [images[1], images[0]]
        first_input = Image.open(row_images[0]).convert("RGB").resize((widths[row][0], CELL_HEIGHT), Image.NEAREST)
        np.testing.assert_array_equal(_cell(grids[4], row, 0, widths), np.asarray(first_input))
        before = [_cell(grids[s], row, n_in, widths) for s in (0, 2, 4)]
        np.testing.assert_array_equal(before[0], before[1])
        np.testing.assert_array_equal(before[0], before[2])
        after2, after4 = _cell(grids[2], row, n_in + 1, widths), _cell(grids[4], row, n_in + 1, widths)
        assert np.abs(after4.astype(int) - before[2]).mean() > 1.0, "the LoRA changed nothing visible"
        assert np.abs(after4.astype(int) - after2).mean() > 0.1
        neg = " " if negative is None else negative  # validation.negative_prompt defaults to " "
        ref_before = _pipeline_image(base_pipe, row_images, prompt, neg, seed)
        ref_after = _pipeline_image(lora_pipe, row_images, prompt, neg, seed)
        # uint8 images; merged LoRA weights vs. adapters differ by fp32 rounding only
        assert np.abs(before[2].astype(int) - ref_before).max() <= 1
        assert np.abs(after4.astype(int) - ref_after).max() <= 2

    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    losses = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    ea = _events(run)
    tb = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert sorted(tb) == [1, 2, 3, 4]
    np.testing.assert_allclose([tb[s] for s in sorted(tb)], [losses[s] for s in sorted(tb)], rtol=1e-6)
    wanted = {"train/lr", "train/grad_norm", "train/sigma", "train/samples_per_s", "train/mse"}
    assert wanted <= set(ea.Tags()["scalars"])
    events = ea.Images("validation/grid")
    assert [e.step for e in events] == [0, 2, 4]
    for e in events:
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")),
                                      grids[e.step])

    # a kill after step 4 was logged but before its checkpoint: the resumed run repeats steps 3-4
    shutil.rmtree(os.path.join(run, "checkpoints", "4"))
    train(_cfg(setup), run, log=lambda m: None)
    ea = _events(run)
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in ea.Images("validation/grid")] == [0, 2, 4]
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4]


def test_prompts_are_encoded_once_and_the_text_encoder_released(setup):
    cfg = _cfg(setup)
    images = ValidationImages.prepare(cfg, None, log=lambda m: None)
    assert images.pipe.text_encoder is None and images.pipe.vae is not None
    assert [e.prompt for e in images.edits] == list(PROMPTS)
    assert images.edits[0].negative_embeds is not None  # true_cfg_scale 4 by default: " " encoded
    assert (images.edits[1].height, images.edits[1].width) == (SIZE, SIZE)  # the last image's size, not the first
    no_cfg = ValidationImages.prepare(_cfg(setup, validation={"true_cfg_scale": 1.0}), None, log=lambda m: None)
    assert all(e.negative_embeds is None for e in no_cfg.edits)
    assert images.pipe.scheduler == q.sampling.QWEN_IMAGE_SCHEDULER  # the repo has none: the released schedule


def test_validation_scheduler_config(setup, tmp_path):
    """`validation.scheduler_config`: the file's schedule for the images and the distance; a bad file is
    refused before anything is written."""
    from qwen_edit_jax.training.validation import check_validation_inputs, validation_scheduler

    path = tmp_path / "lightning.json"
    path.write_text(json.dumps({"use_dynamic_shifting": True, "base_shift": 1.0986, "max_shift": 1.0986,
                                "max_image_seq_len": 8192, "_class_name": "FlowMatchEulerDiscreteScheduler"}))
    cfg = _cfg(setup, validation={"scheduler_config": str(path), "true_cfg_scale": 1.0})
    check_validation_inputs(cfg)
    images = ValidationImages.prepare(cfg, None, log=lambda m: None)
    assert images.pipe.scheduler == validation_scheduler(cfg) == q.sampling.read_scheduler_config(path)
    assert images.pipe.scheduler.max_shift == 1.0986 and images.pipe.scheduler.shift_terminal is None
    path.write_text('{"use_dynamic_shifting": true, "sigma_max": 1.0}')
    with pytest.raises(ConfigError, match=r"validation.scheduler_config=.*lightning.json: unknown key 'sigma_max'"):
        train(cfg, tmp_path / "a", log=lambda m: None)
    cfg = _cfg(setup, validation={"scheduler_config": str(tmp_path / "nope.json")})
    with pytest.raises(ConfigError, match=r"validation.scheduler_config=.*nope.json: scheduler config not found"):
        train(cfg, tmp_path / "a", log=lambda m: None)
    assert not os.path.exists(tmp_path / "a")


def test_bad_validation_inputs_name_the_key_and_write_nothing(setup, tmp_path):
    repo, _, images = setup
    missing = str(tmp_path / "nope.png")
    cfg = _cfg(setup, validation={"prompts": [{"prompt": "x", "images": [images[0], missing]}]})
    with pytest.raises(ConfigError, match=r"validation\.prompts\[0\]\.images\[1\]=.*nope\.png: no such image"):
        train(cfg, tmp_path / "a", log=lambda m: None)
    assert not os.path.exists(tmp_path / "a")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cfg = _cfg(setup, validation={"prompts": [{"prompt": "x", "images": [str(tmp_path / "bad.png")]}]})
    with pytest.raises(ConfigError, match=r"images\[0\]=.*bad\.png: not a readable image"):
        train(cfg, tmp_path / "a", log=lambda m: None)
    cfg = _cfg(setup, validation={"repo": str(tmp_path)})
    with pytest.raises(ConfigError, match="validation.repo=.*no model_index.json"):
        train(cfg, tmp_path / "a", log=lambda m: None)
    assert not os.path.exists(tmp_path / "a")
    with pytest.raises(ConfigError, match="validation.every=2: needs validation.prompts"):
        _cfg(setup, validation={"prompts": []})
    with pytest.raises(ConfigError, match=r"validation.prompts\[0\].images=\[\]: at least one"):
        _cfg(setup, validation={"prompts": [{"prompt": "x", "images": []}]})


def test_model_path_outside_a_repo_needs_validation_repo(setup, tmp_path):
    repo, _, _ = setup
    shutil.copytree(os.path.join(repo, "transformer"), tmp_path / "dit")
    cfg = _cfg(setup, model={"path": str(tmp_path / "dit")})
    with pytest.raises(ConfigError, match="set validation.repo"):
        train(cfg, tmp_path / "a", log=lambda m: None)
    assert not os.path.exists(tmp_path / "a")


def test_only_the_main_process_writes_logs(tmp_path):
    log = RunLog(str(tmp_path), resumed_step=0, enabled=False, tensorboard=True)
    log.scalars(1, {"loss": 1.0})
    log.image("validation/grid", 1, Image.new("RGB", (8, 8)))
    log.close()
    assert os.listdir(tmp_path) == []


MESH_RUN = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np
from qwen_edit_jax.loading import load_transformer
from qwen_edit_jax.parallel import make_mesh
from qwen_edit_jax.training.config import config_from_dict
from qwen_edit_jax.training.validation import ValidationImages
cfg = config_from_dict(json.loads(sys.argv[1]))
out = {}
for name, mesh in (("one", None), ("mesh", make_mesh(data=2, fsdp=2))):
    model = load_transformer(cfg.model.path, options=cfg.model_options(), mesh=mesh)
    images = ValidationImages.prepare(cfg, mesh, log=lambda m: None)
    out[name] = np.asarray(images.sample(model)[0], np.int16)
    if mesh is not None:  # the weights really are split over the mesh
        kernel = model.transformer_blocks.attn.to_qkv.kernel[...]
        assert len(kernel.sharding.device_set) == 4 and not kernel.sharding.is_fully_replicated
diff = np.abs(out["mesh"] - out["one"])
print("MESH_IMAGE", json.dumps({"max": int(diff.max()), "mean": float(diff.mean())}))
"""


@pytest.mark.slow
def test_validation_on_a_mesh_equals_one_device(setup, tmp_path):
    """Validation images with the DiT, VAE and text encoder on a 2×2 (data, fsdp) mesh of simulated devices
    equal one device's (uint8 pixels; fp32 reductions in another order may move a pixel by 1-2)."""
    import subprocess
    import sys

    repo, cache, images = setup
    d = _cfg(setup, validation={"prompts": [{"prompt": PROMPTS[1], "images": [images[1], images[0]],
                                             "negative_prompt": "blurry"}]}).to_dict()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", MESH_RUN, json.dumps(d), str(tmp_path)], cwd=root,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stdout.split("MESH_IMAGE", 1)[1])
    assert stats["max"] <= 2 and stats["mean"] < 0.05, stats
