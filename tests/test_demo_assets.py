"""The demo's assets (`qwen_edit_jax.testing`) and the CLI that writes them (`qwen_edit_jax.demo`): the
readable VAE, the tiny repo, the edit pairs, the latent demo.

- Readable VAE: encode → decode of images made of flat 8×8 blocks comes back within 1e-3, in our JAX
  VAE and in diffusers' `AutoencoderKLQwenImage` reading the folder `save_vae` wrote; any image comes
  back as its 8×8 block means. `save_vae` / `from_flax` are checked on a random VAE as well (a random
  kernel is not symmetric, so a transposed or misplaced tap would show), against diffusers.
- Repo: loads in `QwenImageEditPipeline` and edits a 128×128 image into a 128×128 image.
- Pairs: read by the caching layouts reader; every target is what its caption says, computed here
  from the input image alone; deterministic in the seed; the held-out validation inputs are not
  training inputs.
- Writes are atomic: an exception in the middle leaves no destination (and no temporary) folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qwen_edit_jax import QwenImageEditPipeline
from qwen_edit_jax.caching.layouts import read_dataset
from qwen_edit_jax.config import preset
from qwen_edit_jax.demo import __main__ as cli
from qwen_edit_jax.loading import load_transformer
from qwen_edit_jax.testing import latent
from qwen_edit_jax.testing import pairs as pairs_module
from qwen_edit_jax.testing import repo as repo_module
from qwen_edit_jax.testing.latent import LatentDemo, write_latent_demo
from qwen_edit_jax.testing.pairs import DEMO_EDITS, Scene, demo_validation_prompts, write_demo_pairs
from qwen_edit_jax.testing.repo import write_demo_repo
from qwen_edit_jax.testing.vae import demo_vae_config, latent_matrix
from qwen_edit_jax.imaging import calculate_dimensions
from qwen_edit_jax.loading.vae import init_vae, load_vae, save_vae, vae_params
from qwen_edit_jax.sampling import FlowMatchConfig
from qwen_edit_jax.training.config import load_config
from qwen_edit_jax.cache_format import CachedDataset
from qwen_edit_jax.weights.vae_keys import from_flax, to_flax, vae_keys

TOL = 1e-3
SIZE = 128
NUM_PAIRS = 12  # three rounds of the four edits


def blocky(rng: np.random.Generator, batch: int, h: int, w: int) -> np.ndarray:
    """[B, 3, 8h, 8w] float32 in [-1, 1], constant on every 8×8 block."""
    cells = rng.uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)
    return np.repeat(np.repeat(cells, 8, axis=2), 8, axis=3)


def means_of_blocks(x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    m = x.reshape(b, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5))
    return np.repeat(np.repeat(m, 8, axis=2), 8, axis=3)


def load_rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_demo_repo(tmp_path_factory.mktemp("repo") / "tiny-qwen-image-edit")


@pytest.fixture(scope="module")
def pipe(repo):
    """The repo in our pipeline (fp32). Its VAE is `load_vae(repo / "vae")`: the VAE tests use it at the
    pipeline's 128×128, so encode / decode compile once for the whole file."""
    pipe = QwenImageEditPipeline.from_pretrained(repo, dtype=jnp.float32)
    pipe.vae_image_area = SIZE * SIZE
    return pipe


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_demo_pairs(tmp_path_factory.mktemp("pairs") / "pairs", num_pairs=NUM_PAIRS, size=SIZE)


# ---- the readable VAE ---------------------------------------------------------------------------------
def test_readable_vae_jax(pipe):
    vae = pipe.vae  # load_vae of the folder save_vae wrote, fp32
    assert vae.dtype == jnp.float32 and vae.config.latents_std == (1.0,) * 16
    rng = np.random.default_rng(0)
    x = blocky(rng, 1, SIZE // 8, SIZE // 8)
    latents = np.asarray(vae.encode(x))
    err = np.abs(np.asarray(vae.decode(latents)) - x).max()
    assert err <= TOL, err
    print(f"readable VAE, JAX fp32: max |decode(encode(x)) − x| = {err:.2e}")
    # the latents are M · (block colour), unit variance for uniform colours (mean 0 / std 1 in the config)
    m = latent_matrix(vae.config.z_dim)
    np.testing.assert_allclose(latents, np.einsum("zc,bchw->bzhw", m, x[:, :, ::8, ::8]), atol=TOL)
    assert 0.8 < latents.std() < 1.2
    # any image: its 8×8 block means
    y = rng.uniform(-1, 1, x.shape).astype(np.float32)
    err = np.abs(np.asarray(vae.decode(vae.encode(y))) - means_of_blocks(y)).max()
    assert err <= TOL, err


def test_readable_vae_diffusers(repo):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKLQwenImage.from_pretrained(repo / "vae").float().eval()
    x = blocky(np.random.default_rng(1), 2, 6, 10)
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x)[:, :, None]).latent_dist.mode()
        y = model.decode(z).sample[:, :, 0].numpy()
    err = np.abs(y - x).max()
    assert err <= TOL, err
    print(f"readable VAE, diffusers fp32: max |decode(encode(x)) − x| = {err:.2e}")


def test_from_flax_inverts_to_flax():
    config = demo_vae_config()
    params = vae_params(init_vae(config, seed=3))
    seen = set()
    for key in vae_keys(config):
        if key.flax is None:
            assert not from_flax(key, None).any() and from_flax(key, None).shape == key.shape
            continue
        tensor = from_flax(key, params[key.flax])
        assert tensor.shape == key.shape
        np.testing.assert_array_equal(to_flax(key, tensor), params[key.flax])
        if tensor.ndim == 5:  # causal 3D conv: only the last temporal tap
            assert not tensor[:, :, :-1].any()
        seen.add(key.flax)
    assert seen == set(params)


def test_save_vae_random_matches_diffusers(tmp_path):
    """A random VAE written by `save_vae`: reloads bit-exactly here, and diffusers decodes as we do."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ours = init_vae(demo_vae_config(), seed=5, dtype=jnp.float32)
    folder = save_vae(ours, tmp_path / "vae")
    with pytest.raises(FileExistsError):
        save_vae(ours, folder)
    again = vae_params(load_vae(folder, dtype=jnp.float32))
    for name, value in vae_params(ours).items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    latents = np.random.default_rng(2).standard_normal((1, 16, 2, 3)).astype(np.float32)
    model = diffusers.AutoencoderKLQwenImage.from_pretrained(folder).float().eval()
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(latents)[:, :, None]).sample[:, :, 0].numpy()
    out = np.asarray(ours.decode(latents))
    assert np.abs(ref).max() > 0.05  # not trivially zero
    np.testing.assert_allclose(out, ref, atol=1e-4)


# ---- the repo ----------------------------------------------------------------------------------------
def test_repo_runs_in_the_pipeline(repo, pipe):
    index = json.loads((repo / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    sched = json.loads((repo / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert pipe.variant == "edit_plus" and pipe.scheduler == FlowMatchConfig()  # the released schedule
    assert pipe.transformer.config == preset("tiny")
    image = Image.fromarray(Scene(SIZE, (255, 255, 255), (0, 0, 255), 16, 24, 32).render())
    out = pipe(image=[image], prompt="make the square red", num_inference_steps=2, true_cfg_scale=1.0, seed=0,
               output_type="np")
    assert out.images.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(out.images).all()


def test_repo_is_reused_and_checked(repo):
    mtime = os.stat(repo / "model_index.json").st_mtime_ns
    assert write_demo_repo(repo) == repo
    assert os.stat(repo / "model_index.json").st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="not the demo repo for variant=.edit_plus., seed=1"):
        write_demo_repo(repo, seed=1)


def test_interrupted_repo_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(repo_module, "write_random_transformer", fail)  # after the text encoder and VAE are written
    with pytest.raises(RuntimeError, match="killed"):
        write_demo_repo(tmp_path / "repo")
    assert os.listdir(tmp_path) == []


# ---- the pairs ---------------------------------------------------------------------------------------
def square_box(img: np.ndarray, background: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the pixels that are not the background; they must fill it."""
    ys, xs = np.nonzero((img != background).any(-1))
    box = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    assert (img[box[0]:box[2], box[1]:box[3]] != background).any(-1).all()
    return box


def expected_target(prompt: str, x: np.ndarray) -> np.ndarray:
    """What the instruction does to input `x`, computed from the pixels alone."""
    colours, counts = np.unique(x.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) == 2  # a background and a square
    background = colours[counts.argmax()]
    top, left, bottom, right = square_box(x, background)
    out = x.copy()
    if prompt == "make the square red":
        out[top:bottom, left:right] = (255, 0, 0)
    elif prompt == "mirror the image":
        out = x[:, ::-1]
    elif prompt == "make the background black":
        out[(x == background).all(-1)] = 0
    elif prompt == "move the square to the left edge":
        square = x[top:bottom, left:right].copy()
        out[:] = background
        out[top:bottom, : right - left] = square
    else:
        raise AssertionError(f"no check for the instruction {prompt!r}")
    return out


def test_pairs_are_read_and_edits_match_captions(pairs):
    listing = read_dataset(pairs)
    assert listing.kind == "folder" and not listing.problems and not listing.notes
    assert len(listing.samples) == NUM_PAIRS
    prompts = list(DEMO_EDITS)
    for i, s in enumerate(sorted(listing.samples, key=lambda s: s.sample_id)):
        caption = open(s.caption_file).read().strip()
        assert caption == prompts[i % len(prompts)]
        x, y = load_rgb(s.controls[0]), load_rgb(s.target)
        assert x.shape == y.shape == (SIZE, SIZE, 3)
        assert not np.array_equal(x, y), s.sample_id  # every edit is visible
        np.testing.assert_array_equal(y, expected_target(caption, x), err_msg=f"{s.sample_id}: {caption}")
        for img in (x, y):  # flat 8×8 blocks: what the readable VAE reproduces exactly
            f = img.astype(np.float32).transpose(2, 0, 1)[None]
            np.testing.assert_array_equal(means_of_blocks(f), f)


def test_pairs_are_deterministic(pairs, tmp_path):
    same = write_demo_pairs(tmp_path / "same", num_pairs=NUM_PAIRS, size=SIZE, seed=0)
    other = write_demo_pairs(tmp_path / "other", num_pairs=NUM_PAIRS, size=SIZE, seed=1)
    names = sorted(os.listdir(pairs / "control"))
    assert len(names) == NUM_PAIRS
    for name in names:
        np.testing.assert_array_equal(load_rgb(same / "control" / name), load_rgb(pairs / "control" / name))
        np.testing.assert_array_equal(load_rgb(same / name), load_rgb(pairs / name))
    assert any(not np.array_equal(load_rgb(other / "control" / n), load_rgb(pairs / "control" / n)) for n in names)


def test_pairs_reuse_and_interruption(pairs, tmp_path, monkeypatch):
    mtime = os.stat(pairs / "0000.png").st_mtime_ns
    assert write_demo_pairs(pairs, num_pairs=NUM_PAIRS, size=SIZE) == pairs
    assert os.stat(pairs / "0000.png").st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="remove it"):
        write_demo_pairs(pairs, num_pairs=NUM_PAIRS + 1, size=SIZE)
    with pytest.raises(ValueError, match="multiple of 32"):
        write_demo_pairs(tmp_path / "bad", size=100)
    saved = []

    def save_then_fail(img, path):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(path)
        Image.fromarray(img).save(path)

    monkeypatch.setattr(pairs_module, "_save_png", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_demo_pairs(tmp_path / "killed", num_pairs=NUM_PAIRS, size=SIZE)
    assert len(saved) == 5 and os.listdir(tmp_path) == []


def test_validation_inputs_are_held_out(pairs, tmp_path):
    entries = demo_validation_prompts(tmp_path / "validation", size=SIZE, num_pairs=NUM_PAIRS)
    assert [e["prompt"] for e in entries] == list(DEMO_EDITS)
    training = [load_rgb(pairs / "control" / n) for n in os.listdir(pairs / "control")]
    for e in entries:
        (path,) = e["images"]
        x = load_rgb(path)
        assert not any(np.array_equal(x, t) for t in training)
        np.testing.assert_array_equal(load_rgb(e["expected"]), expected_target(e["prompt"], x))
    assert demo_validation_prompts(tmp_path / "validation", size=SIZE, num_pairs=NUM_PAIRS) == entries


# ---- the latent demo ---------------------------------------------------------------------------------
def test_latent_demo_is_where_its_config_reads_it():
    """`python -m qwen_edit_jax.demo --out demo_data` writes what train/configs/latent_demo.yaml reads."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "train", "configs", "latent_demo.yaml"))
    assert cfg.model.path == os.path.join("demo_data", cli.LATENT, latent.MODEL_DIR)
    assert cfg.data.path == os.path.join("demo_data", cli.LATENT, latent.CACHE_DIR)


def test_latent_demo_reuse_and_interruption(tmp_path, monkeypatch):
    small = LatentDemo(num_layers=1, num_samples=4, latent_sizes=((4, 4),))
    folder = write_latent_demo(tmp_path / "latent", small)
    assert sorted(os.listdir(folder)) == sorted([".demo.json", latent.CACHE_DIR, latent.MODEL_DIR])
    ds = CachedDataset(str(folder / latent.CACHE_DIR))
    assert len(ds) == 4 and ds[0].sample_id == "demo-00000-edit0" and ds.metadata["source"] == latent.__name__
    mtime = os.stat(folder / latent.MODEL_DIR / "config.json").st_mtime_ns
    assert write_latent_demo(folder, small) == folder
    assert os.stat(folder / latent.MODEL_DIR / "config.json").st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="not the demo latent for .*num_samples=5"):
        write_latent_demo(folder, LatentDemo(num_layers=1, num_samples=5, latent_sizes=((4, 4),)))

    def fail(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(latent, "write_latent_cache", fail)  # after the checkpoint is written
    with pytest.raises(RuntimeError, match="killed"):
        write_latent_demo(tmp_path / "killed", small)
    assert os.listdir(tmp_path) == ["latent"]


# ---- the command line --------------------------------------------------------------------------------
def test_cli(repo, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = tmp_path / "out"
    shutil.copytree(repo, out / cli.REPO)  # a finished repo is reused (and not rebuilt: that takes seconds)
    assert cli.main(["--out", str(out), "--num-pairs", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"reused tiny Qwen-Image-Edit repo: {out / cli.REPO}" in printed
    assert f"wrote 4 edit pairs: {out / cli.PAIRS}" in printed
    assert f"wrote latent demo (random tiny DiT, 128 cached samples): {out / cli.LATENT}" in printed
    assert sorted(os.listdir(out)) == sorted([cli.REPO, cli.PAIRS, cli.VALIDATION, cli.LATENT])
    assert len(read_dataset(out / cli.PAIRS).samples) == 4
    assert len(CachedDataset(str(out / cli.LATENT / latent.CACHE_DIR))) == LatentDemo().num_samples
    assert load_transformer(str(out / cli.LATENT / latent.MODEL_DIR)).config == LatentDemo().dit_config()
    assert cli.main(["--out", str(out), "--num-pairs", "4"]) == 0
    assert capsys.readouterr().out.count("reused") == 4
    assert cli.main(["--out", str(out), "--num-pairs", "5"]) == 2  # the pairs there were made with 4
    assert "remove it or choose another folder" in capsys.readouterr().err


def test_sample_cli_resolution_sizes_the_edit_as_the_cache(repo, tmp_path):
    """`sample/sample.py --resolution N`: inputs go to the VAE at N² (as a cache made at N), the output follows."""
    spec = importlib.util.spec_from_file_location(
        "sample_cli", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample", "sample.py"))
    sample_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_cli)
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(image)
    rc = sample_cli.main(["--model", str(repo), "--image", str(image), "--prompt", "make the square red",
                          "--resolution", "64", "--cfg", "1", "--steps", "2", "--dtype", "float32",
                          "--out", str(tmp_path / "out")])
    assert rc == 0
    out = Image.open(tmp_path / "out" / "in-0.png")
    assert out.size == calculate_dimensions(64 * 64, 2.0) == (96, 32)  # ≈ 64² at 2:1, not the default ≈ 1024²
    assert out.text["vae_image_area"] == str(64 * 64)
