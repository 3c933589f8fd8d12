"""`sample/sample.py` writing PNGs: edits of given images (image mode) and decoded cache samples (cache mode
with a repo folder), on a tiny random Edit-Plus repo; one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from qwen_edit_jax.pipeline import QwenImageEditPipeline, latents_to_images  # noqa: E402
from qwen_edit_jax.cache_format import CachedSample, write_cache  # noqa: E402
from tests import pipeline_reference as P  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SEED, PROMPT = 2, 3, "make the sky orange"


def _load_cli():
    spec = importlib.util.spec_from_file_location("sample_cli", os.path.join(ROOT, "sample", "sample.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline_cli")
    parts = P.build_parts(tmp / "parts")
    plus = P.make_repo(parts, tmp / "plus", "edit_plus")
    edit = P.make_repo(parts, tmp / "edit", "edit")
    images = []
    for k, (w, h) in enumerate([(84, 56), (60, 90)]):
        path = tmp / f"in{k}.png"
        P.random_image(w, h, k).save(path)
        images.append(str(path))
    return {"tmp": tmp, "plus": plus.root, "edit": edit.root, "images": images}


@pytest.fixture
def small(monkeypatch):
    """Tiny sizing areas (the real 1024² would make the test slow)."""
    monkeypatch.setattr(QwenImageEditPipeline, "vae_image_area", P.VAE_AREA)
    monkeypatch.setattr(QwenImageEditPipeline, "condition_image_area", P.CONDITION_AREA)


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    return err


@pytest.mark.slow
def test_edit_images_writes_pngs_equal_to_the_pipeline(setup, small, tmp_path, capsys):
    """Image mode (two references, true CFG, two images per prompt) writes `<stem>-<seed>-<k>.png` with the
    pipeline's exact pixels, the file mode the umask gives, and the settings in the text chunks."""
    cli = _load_cli()
    out = tmp_path / "out"
    args = ["--model", setup["plus"], "--image", setup["images"][0], "--image", setup["images"][1],
            "--prompt", PROMPT, "--out", str(out), "--steps", str(STEPS), "--seed", str(SEED), "--dtype", "float32",
            "--num-images", "2"]
    old = os.umask(0o022)
    try:
        rc = cli.main(args)
    finally:
        os.umask(old)
    assert rc == 0, capsys.readouterr().err
    names = [f"in0-{SEED}-{k}.png" for k in (0, 1)]
    assert sorted(os.listdir(out)) == names
    pngs = [Image.open(out / n) for n in names]
    assert all(oct(os.stat(out / n).st_mode & 0o777) == "0o644" for n in names)
    text = pngs[0].text
    assert (text["prompt"], text["negative_prompt"], text["seed"], text["true_cfg_scale"]) == (PROMPT, " ", "3", "4.0")

    pipe = QwenImageEditPipeline.from_pretrained(setup["plus"], dtype=jnp.float32)
    images = [Image.open(p).convert("RGB") for p in setup["images"]]
    expected = pipe(image=images, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=STEPS,
                    num_images_per_prompt=2, seed=SEED).images
    for png, exp in zip(pngs, expected):
        assert png.size == exp.size == (96, 128)  # ≈ the (shrunk) area at the last image's 2:3 ratio
        assert np.abs(np.asarray(png, np.int16) - np.asarray(exp, np.int16)).max() <= 1
    assert np.abs(np.asarray(pngs[0], np.int16) - np.asarray(pngs[1], np.int16)).max() > 0  # noise per image

    assert cli.main(args) == 2  # existing outputs: an error before anything loads
    _one_line_error(capsys, "already exists", "--overwrite")


def test_cache_with_a_repo_writes_pngs_next_to_the_latents(setup, tmp_path, capsys):
    rng = np.random.default_rng(0)
    samples = [CachedSample(f"s/{i}", rng.standard_normal((16, 8, 12), np.float32),
                            [rng.standard_normal((16, 8, 8), np.float32)],
                            rng.standard_normal((5 + i, P.DIT.joint_attention_dim), np.float32), np.ones(5 + i, bool))
               for i in range(2)]
    cache = write_cache(str(tmp_path / "cache"), samples)
    cli = _load_cli()
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        rc = cli.main(["--cache", cache, "--model", setup["plus"], "--out", str(out), "--steps", str(STEPS),
                       "--cfg", "1", "--dtype", "float32", "--batch-size", "2"])
    finally:
        os.umask(old)
    assert rc == 0, capsys.readouterr().err
    assert "latents + PNG" in capsys.readouterr().out
    pngs = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    assert len(pngs) == 2 and len(os.listdir(out)) == 4
    vae = QwenImageEditPipeline.from_pretrained(setup["plus"], dtype=jnp.float32, components=("vae",)).vae
    for name in pngs:
        latents = load_file(str(out / name.replace(".png", ".safetensors")))["latents"]
        png = Image.open(out / name)
        assert png.size == (96, 64) and oct(os.stat(out / name).st_mode & 0o777) == "0o644"
        np.testing.assert_array_equal(np.asarray(png), np.asarray(latents_to_images(vae, latents[None])[0]))
    # a PNG already there: error before loading anything; --skip-existing keeps both
    assert cli.main(["--cache", cache, "--model", setup["plus"], "--out", str(out), "--steps", "1"]) == 2
    _one_line_error(capsys, "already exists")
    assert cli.main(["--cache", cache, "--model", setup["plus"], "--out", str(out), "--skip-existing"]) == 0


def test_bad_input_is_a_one_line_error(setup, tmp_path, capsys):
    cli = _load_cli()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    sched = tmp_path / "sched.json"
    sched.write_text('{"shift": 3.0, "sigma_min": 0.01}')
    out = str(tmp_path / "out")
    one, two = setup["images"]
    base = ["--model", setup["plus"], "--out", out, "--prompt", PROMPT]
    cases = [
        (base + ["--image", str(tmp_path / "missing.png")], [f"--image {tmp_path / 'missing.png'}: file not found"]),
        (base + ["--image", str(bad)], [f"--image {bad}: cannot read the image"]),
        (base + ["--image", one, "--height", "8"], ["--height 8", "at least 16"]),
        (base + ["--image", one, "--width", "0"], ["--width 0"]),
        (["--model", setup["edit"], "--out", out, "--prompt", PROMPT, "--image", one, "--image", two],
         ["one image", "Edit-Plus"]),
        (["--model", setup["plus"], "--out", out, "--image", one], ["--image needs --prompt"]),
        (base + ["--image", one, "--cache", str(tmp_path)], ["either --cache", "or --image"]),
        (["--model", setup["plus"], "--out", out], ["either --cache", "or --image"]),
        (["--model", os.path.join(setup["plus"], "transformer"), "--out", out, "--prompt", PROMPT, "--image", one],
         ["model_index.json: not found"]),
        (["--model", str(tmp_path / "nope"), "--out", out, "--prompt", PROMPT, "--image", one], ["no such folder"]),
        (base + ["--image", one, "--lora", str(tmp_path / "l.safetensors")], ["LoRA file not found"]),
        (base + ["--image", one, "--scheduler-config", str(tmp_path / "s.json")], ["s.json: scheduler config not found"]),
        (base + ["--image", one, "--scheduler-config", str(sched)], ["sched.json: unknown key 'sigma_min'"]),
    ]
    for args, fragments in cases:
        assert cli.main(args) == 2, args
        _one_line_error(capsys, *fragments)
    assert not os.path.exists(out)  # nothing written, no folder made
