"""`sample/sample.py` end to end (cache → base + LoRA → latent files) against the diffusers loop, and
`validation_distance`."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import qwen_edit_jax as q
from qwen_edit_jax import sampling
from qwen_edit_jax.cache_format import CachedDataset, CachedSample, write_cache
from tests.sampling_reference import diffusers_edit_loop
from tests.compare import assert_close, assert_differs
from tests.torch_reference import make_torch_model, save_torch_model

TOL = 3e-5  # the command's latents vs diffusers: ≈ 10× the measured ≤ 2.2e-6 (2026-12-07, 2-core CPU)
TINY = q.preset("tiny")
STEPS, CFG, SEED = 3, 4.0, 7
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_cli():
    spec = importlib.util.spec_from_file_location("sample_cli", os.path.join(ROOT, "sample", "sample.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _samples(rng):
    def text(n, pad=0):
        e = rng.standard_normal((n, TINY.joint_attention_dim), dtype=np.float32)
        m = np.ones(n, bool)
        if pad:
            e[-pad:], m[-pad:] = 0.0, False
        return e, m

    def lat(h, w):
        return rng.standard_normal((16, h, w), dtype=np.float32)

    out = []
    for i, (plen, ppad, nlen) in enumerate([(7, 2, 4), (5, 0, 6)]):  # same layout, different text lengths
        pe, pm = text(plen, ppad)
        ne, nm = text(nlen)
        out.append(CachedSample(f"edit/{i}", lat(8, 8), [lat(8, 8), lat(6, 10)], pe, pm, ne, nm))
    pe, pm = text(6)
    out.append(CachedSample("t2i", lat(6, 8), [], pe, pm))  # another layout, no negative prompt
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample_cli")
    tm = make_torch_model(TINY, seed=11)
    base = save_torch_model(tm, str(tmp / "base"))
    samples = _samples(np.random.default_rng(0))
    cache = write_cache(str(tmp / "cache"), samples)
    # a diffusers-style LoRA on two modules
    g = np.random.default_rng(1)
    d, r = TINY.inner_dim, 4
    lora = {}
    for mod in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"):
        fan_in = 4 * d if mod.endswith("net.2") else d
        lora[f"transformer.{mod}.lora_A.weight"] = (g.standard_normal((r, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        lora[f"transformer.{mod}.lora_B.weight"] = (0.5 * g.standard_normal((d, r)) / np.sqrt(r)).astype(np.float32)
    lora_path = str(tmp / "lora.safetensors")
    save_file(lora, lora_path)
    return {"tmp": tmp, "tm": tm, "base": base, "cache": cache, "samples": samples, "lora": lora,
            "lora_path": lora_path}


def _torch_with_lora(tm, lora, scale):
    """The torch model with W += scale·B@A merged by hand (independent of our LoRA code)."""
    tl = copy.deepcopy(tm)
    params = dict(tl.named_parameters())
    with torch.no_grad():
        for k, a in lora.items():
            if ".lora_A." in k:
                mod = k[len("transformer."):].split(".lora_A.")[0]
                b = lora[k.replace("lora_A", "lora_B")]
                params[f"{mod}.weight"] += torch.from_numpy(scale * (b @ a))
    return tl


def _torch_sample(tm, s: CachedSample):
    """The diffusers loop on one cached sample with the same noise as ours."""
    h, w = s.target.shape[1:]
    noise = sampling.sample_noise(SEED, (1, (h // 2) * (w // 2), 64), s.sample_id)
    refs = np.concatenate([np.asarray(q.pack_latents(r[None])) for r in s.references], 1) if s.references else None
    shapes = [[(1, h // 2, w // 2), *((1, r.shape[1] // 2, r.shape[2] // 2) for r in s.references)]]
    t = torch.from_numpy
    has_neg = s.negative_prompt_embeds is not None
    out = diffusers_edit_loop(
        tm, latents=t(noise), image_latents=None if refs is None else t(refs),
        prompt_embeds=t(s.prompt_embeds[None]), prompt_embeds_mask=t(s.prompt_mask[None].astype(np.int64)),
        negative_prompt_embeds=t(s.negative_prompt_embeds[None]) if has_neg else None,
        negative_prompt_embeds_mask=t(s.negative_prompt_mask[None].astype(np.int64)) if has_neg else None,
        true_cfg_scale=CFG, num_inference_steps=STEPS, img_shapes=shapes).numpy()
    return np.asarray(q.unpack_latents(out, h, w, frames_axis=False))[0]


def _read(path):
    with safe_open(path, framework="numpy") as f:
        return f.get_tensor("latents"), f.metadata()


def test_cli_base_plus_lora_matches_diffusers(setup, capsys):
    cli = _load_cli()
    out = setup["tmp"] / "out_lora"
    rc = cli.main(["--cache", setup["cache"], "--model", setup["base"], "--lora", f"{setup['lora_path']}:0.5",
                   "--out", str(out), "--steps", str(STEPS), "--cfg", str(CFG), "--seed", str(SEED),
                   "--batch-size", "2", "--dtype", "float32", "--batched-cfg"])  # the default on CPU: separate
    assert rc == 0, capsys.readouterr().err
    tl = _torch_with_lora(setup["tm"], setup["lora"], 0.5)
    files = sorted(os.listdir(out))
    assert len(files) == 3 and all(f.endswith(".safetensors") for f in files)
    for s in setup["samples"]:
        lat, meta = _read(str(out / sampling.output_name(s.sample_id)))
        assert lat.shape == s.target.shape and lat.dtype == np.float32
        assert meta["sample_id"] == s.sample_id and meta["num_inference_steps"] == str(STEPS)
        assert_close(lat, _torch_sample(tl, s), TOL, f"cli base plus lora matches diffusers {s.sample_id}")
    # the LoRA really changed the result
    base_ref = _torch_sample(setup["tm"], setup["samples"][0])
    lat0, _ = _read(str(out / sampling.output_name("edit/0")))
    assert_differs(lat0, base_ref, 1e-3, "cli base plus lora matches diffusers")


def test_cli_existing_outputs_and_errors(setup, capsys):
    cli = _load_cli()
    out = setup["tmp"] / "out_base"
    common = ["--cache", setup["cache"], "--model", setup["base"], "--out", str(out), "--steps", "2",
              "--dtype", "float32", "--ids", "t2i"]
    assert cli.main(common) == 0
    first, _ = _read(str(out / "t2i.safetensors"))
    assert os.listdir(out) == ["t2i.safetensors"]  # only the selected id, no temporary files left
    capsys.readouterr()
    assert cli.main(common) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(common + ["--skip-existing"]) == 0
    assert cli.main(common + ["--overwrite", "--seed", "1"]) == 0
    second, _ = _read(str(out / "t2i.safetensors"))
    assert not np.array_equal(first, second)  # replaced, new seed
    capsys.readouterr()
    assert cli.main(common[:-1] + ["nope"]) == 2
    assert "no samples with ids ['nope']" in capsys.readouterr().err
    assert cli.main(["--cache", str(setup["tmp"] / "missing"), "--model", setup["base"], "--out", str(out)]) == 2
    assert "cached dataset folder not found" in capsys.readouterr().err
    assert cli.main(common + ["--overwrite", "--lora", str(setup["tmp"] / "no.safetensors")]) == 2
    assert "LoRA file not found" in capsys.readouterr().err


def test_cli_cfg_without_negative_prompt_warns_and_records_the_scale_used(setup, capsys):
    """`--cfg 4` on a sample without a cached negative prompt: a warning, and the file says CFG was 1."""
    cli = _load_cli()
    out = setup["tmp"] / "out_nocfg"
    assert cli.main(["--cache", setup["cache"], "--model", setup["base"], "--out", str(out), "--steps", "2",
                     "--dtype", "float32", "--cfg", "4.0"]) == 0
    err = capsys.readouterr().err
    assert "warning: true_cfg_scale=4.0 but 1 of 3 samples have no cached negative prompt" in err
    _, meta = _read(str(out / "t2i.safetensors"))
    assert meta["true_cfg_scale"] == "1.0" and meta["requested_true_cfg_scale"] == "4.0"
    _, meta = _read(str(out / sampling.output_name("edit/0")))
    assert meta["true_cfg_scale"] == "4.0"  # this one has a negative prompt: CFG ran


def test_cli_bad_out_and_lora_strength_are_one_line_errors(setup, tmp_path, capsys):
    cli = _load_cli()
    f = tmp_path / "a_file"
    f.write_text("x")
    common = ["--cache", setup["cache"], "--model", setup["base"], "--steps", "1", "--ids", "t2i"]
    for out, msg in ((f, f"error: --out {f}: is a file, not a folder"),
                     (f / "sub", f"error: --out {f}/sub: {f} is a file, so no folder can be made under it")):
        assert cli.main(common + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(msg) and len(err.strip().splitlines()) == 1, err
    assert cli.main(common + ["--out", str(tmp_path / "o"), "--lora", f"{setup['lora_path']}:abc"]) == 2
    err = capsys.readouterr().err
    assert "strength 'abc' after the last ':' is not a number" in err and "not found" not in err, err
    assert cli.main(common + ["--out", str(tmp_path / "o"), "--lora", f"{tmp_path}/missing.safetensors:0.5"]) == 2
    assert f"--lora {tmp_path}/missing.safetensors: LoRA file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_epilog_keeps_the_usage_lines():
    r = subprocess.run([sys.executable, "sample/sample.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="100"), timeout=120)
    lines = r.stdout.splitlines()
    assert any(line.rstrip().endswith("--model Qwen-Image-Edit-2509/transformer \\") for line in lines), r.stdout
    assert any(line.strip().startswith("--lora runs/demo/lora_diffusers.safetensors:0.8") for line in lines)
    assert r.stdout.count("Sample edit targets from a training cache") == 1  # the description is not repeated


def test_outputs_respect_the_umask_and_a_failed_run_leaves_no_folder(setup, tmp_path, monkeypatch):
    model = q.load_transformer(setup["base"])
    ds = CachedDataset(setup["cache"])
    old = os.umask(0o022)
    try:
        cache = write_cache(str(tmp_path / "cache"), setup["samples"][2:])
        out = sampling.sample_dataset(model, ds, tmp_path / "out", indices=[2], progress=False,
                                      settings=sampling.SampleSettings(num_inference_steps=1, true_cfg_scale=1.0))
    finally:
        os.umask(old)
    shard = [n for n in os.listdir(cache) if n.endswith(".safetensors")][0]
    assert oct(os.stat(os.path.join(cache, shard)).st_mode & 0o777) == "0o644"  # safetensors alone writes 0o600
    assert oct(os.stat(out["t2i"]).st_mode & 0o777) == "0o644"

    def boom(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(sampling.cached, "sample_cached_batch", boom)
    with pytest.raises(RuntimeError, match="device lost"):
        sampling.sample_dataset(model, ds, tmp_path / "new" / "out", indices=[2], progress=False,
                                settings=sampling.SampleSettings(true_cfg_scale=1.0))
    assert not (tmp_path / "new" / "out").exists()


def test_batching_does_not_change_samples(setup):
    """Batch-of-2 (padded prompts of different lengths) equals one-at-a-time sampling."""
    model = q.load_transformer(setup["base"])
    ds = CachedDataset(setup["cache"])
    pair = [ds[0], ds[1]]
    kw = {"num_inference_steps": STEPS, "true_cfg_scale": CFG, "seed": SEED}
    batched = sampling.sample_cached_batch(model, pair, **kw)
    for s, b in zip(pair, batched):
        assert_close(b, sampling.sample_cached(model, s, **kw), 2e-5, "batched vs alone")  # measured ≤ 1.4e-6
    with pytest.raises(ValueError, match="do not share one image layout"):
        sampling.sample_cached_batch(model, [ds[0], ds[2]], **kw)


def test_validation_distance(setup):
    model = q.load_transformer(setup["base"])
    s = CachedDataset(setup["cache"])[0]
    d = sampling.validation_distance(model, s, num_inference_steps=STEPS, seed=SEED, true_cfg_scale=CFG)
    ref = _torch_sample(setup["tm"], s)
    expect = float(np.sqrt(np.mean((ref - s.target) ** 2)))
    assert np.isfinite(d) and d == pytest.approx(expect, rel=1e-4)
    # deterministic: the same weights, example and seed give the same number
    assert sampling.validation_distance(model, s, num_inference_steps=STEPS, seed=SEED, true_cfg_scale=CFG) == d
