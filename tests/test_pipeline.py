"""`QwenImageEditPipeline` (JAX) vs diffusers 0.42.1's real `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`.

Tiny random repos in diffusers layout are built here (`tests/pipeline_reference.py`): Edit, Edit-Plus
(two images) and 2511 (`zero_cond_t`). Both pipelines run in fp32 on the same images, prompts and
packed noise (`latents`), with true CFG, diffusers' text encoder called as trained (M-RoPE fix) and
both sides' sizing areas shrunk from 1024² / 384² so the images stay tiny. Bars: prompt embeddings
max|ours − ref| / max|ref| ≤ 1e-4; images (output_type="np", values in [0, 1]) max|ours − ref| ≤ 1e-3.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as hf_edit  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as hf_plus  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from qwen_edit_jax.sampling import QWEN_IMAGE_SCHEDULER  # noqa: E402
from qwen_edit_jax import load_transformer  # noqa: E402
from qwen_edit_jax.errors import CheckpointError  # noqa: E402
from qwen_edit_jax.imaging import output_dims, plan_sizes  # noqa: E402
from qwen_edit_jax.pipeline import (  # noqa: E402
    COMPONENTS, QwenImageEditPipeline, pipeline_variant, scheduler_from_json,
)
from tests import pipeline_reference as P  # noqa: E402
from tests.sampling_reference import LIGHTNING_SCHEDULER_CONFIG as LIGHTNING, make_scheduler  # noqa: E402
from tests.compare import assert_close, rel_err  # noqa: E402

STEPS, CFG = 2, 4.0
# ≈ 10× the error measured on 2026-12-07 (2-core CPU; tests/compare.py says how to re-measure)
EMBED_TOL = 2e-5  # prompt embeds vs diffusers: measured ≤ 1.4e-6
IMAGE_TOL = 5e-5  # the output image (in [0, 1]) vs diffusers: measured ≤ 4.1e-6
PROMPT, NEGATIVE = "make the sky orange and add 3 birds", " "
IMAGES = {"edit": [P.random_image(84, 56, 0)], "edit_plus": [P.random_image(84, 56, 1), P.random_image(60, 90, 2)]}
IMAGES["2511"] = IMAGES["edit_plus"]
MEASURED: dict[str, float] = {}  # printed with -s: the parity numbers quoted in docs/pipeline.md



@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return P.build_parts(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def repos(parts, tmp_path_factory):
    """Repo per variant, built on first use: (torch side, our fp32 pipeline). The repos share the text
    encoder and VAE folders, so the pipelines share those components (and their compiled programs):
    the first is loaded whole, the others load their transformer only."""
    made = {}

    def get(variant):
        if variant not in made:
            repo = P.make_repo(parts, tmp_path_factory.mktemp("repos") / variant, variant)
            first = next(iter(made.values()), (None, None))[1]
            pipe = QwenImageEditPipeline.from_pretrained(
                repo.root, dtype=jnp.float32, components=("transformer",) if first else COMPONENTS)
            if first:
                pipe.text_encoder, pipe.vae = first.text_encoder, first.vae
            pipe.vae_image_area, pipe.condition_image_area = P.VAE_AREA, P.CONDITION_AREA
            made[variant] = (repo, pipe)
        return made[variant]

    return get


def reference_condition_images(ref, variant, images):
    """The images diffusers' `__call__` hands to its `encode_prompt` (its own resize, patched areas)."""
    if variant == "edit":
        w, h, _ = hf_edit.calculate_dimensions(1024 * 1024, images[0].width / images[0].height)
        return ref.image_processor.resize(images[0], h, w)
    sizes = [hf_plus.calculate_dimensions(hf_plus.CONDITION_IMAGE_SIZE, im.width / im.height) for im in images]
    return [ref.image_processor.resize(im, h, w) for im, (w, h) in zip(images, sizes)]


@pytest.mark.parametrize("variant", ["edit", "edit_plus", "2511"])
def test_matches_diffusers(variant, parts, repos, monkeypatch):
    """Prompt embeddings and the whole call (output_type='np') against diffusers, same packed noise."""
    P.small_areas(monkeypatch)
    repo, pipe = repos(variant)
    ref = P.reference_pipeline(parts, repo)
    assert pipe.variant == ("edit" if variant == "edit" else "edit_plus")
    assert pipe.transformer.config.zero_cond_t == (variant == "2511")
    images = IMAGES[variant]

    condition = reference_condition_images(ref, variant, images)
    for text in (PROMPT, NEGATIVE):
        with torch.no_grad():
            ref_embeds, ref_mask = ref.encode_prompt(prompt=[text], image=condition, device=torch.device("cpu"))
        embeds, mask = pipe.encode_prompt([text], images)
        assert ref_mask is None and np.asarray(mask).all()  # one prompt: no padding, diffusers drops the mask
        MEASURED[f"{variant} embeds {text!r}"] = assert_close(embeds, ref_embeds.numpy(), EMBED_TOL,
                                                               f"{variant} prompt embeds {text!r}")

    w, h = plan_sizes(images, pipe.variant, vae_area=P.VAE_AREA).output
    noise = np.random.default_rng(3).standard_normal((1, (h // 16) * (w // 16), 64), dtype=np.float32)
    arg = images[0] if variant == "edit" else images
    with torch.no_grad():
        expected = ref(image=arg, prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=CFG,
                       num_inference_steps=STEPS, latents=torch.from_numpy(noise), output_type="np").images
    out = pipe(image=arg, prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=CFG, num_inference_steps=STEPS,
               latents=noise, output_type="np").images
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == expected.shape == (1, h, w, 3)
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.05  # a real image, not a constant
    MEASURED[f"{variant} image"] = rel_err(out, expected)
    print(f"\n{variant}: " + ", ".join(f"{k.split(' ', 1)[1]} {v:.2e}" for k, v in MEASURED.items()
                                       if k.startswith(variant + " ")))
    assert_close(out, expected, IMAGE_TOL, f"{variant} image")


def test_output_types_seed_and_release(parts, repos):
    """'pil' = diffusers' rounding of 'np'; 'latent' decodes to 'np'; a seed repeats; released parts say so."""
    repo, pipe = repos("edit")
    kw = dict(image=IMAGES["edit"][0], prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=5)
    np_out = pipe(**kw, output_type="np").images
    pil = pipe(**kw, output_type="pil").images
    lat = pipe(**kw, output_type="latent").images
    assert len(pil) == 1 and pil[0].size == (np_out.shape[2], np_out.shape[1]) and pil[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[0]), (np_out[0] * 255).round().astype(np.uint8))
    assert lat.shape == (1, (np_out.shape[1] // 16) * (np_out.shape[2] // 16), 64)
    decoded = np.asarray(pipe.decode_latents(lat, *np_out.shape[1:3]))
    assert_close(np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1), np_out, 1e-6,
                 "decoded latents vs np output")  # measured 0: a float-rounding bar
    other = pipe(**{**kw, "seed": 6}, output_type="np").images
    assert np.abs(other - np_out).max() > 1e-3

    embeds = pipe.encode_prompt(PROMPT, IMAGES["edit"])
    neg = pipe.encode_prompt(NEGATIVE, IMAGES["edit"])
    encoder, pipe.text_encoder = pipe.text_encoder, None
    try:
        with pytest.raises(RuntimeError, match="pipe.text_encoder is not loaded"):
            pipe(**kw)
        # the encoder released, embeddings given: the same image
        again = pipe(image=kw["image"], prompt_embeds=embeds[0], prompt_embeds_mask=embeds[1],
                     negative_prompt_embeds=neg[0], negative_prompt_embeds_mask=neg[1], num_inference_steps=STEPS,
                     seed=5, output_type="np").images
        assert_close(again, np_out, 1e-6, "given embeddings vs prompts")  # measured 0: a float-rounding bar
        vae, pipe.vae = pipe.vae, None
        with pytest.raises(RuntimeError, match="pipe.vae is not loaded") as e:
            pipe(image=kw["image"], prompt_embeds=embeds[0], num_inference_steps=STEPS, seed=5, true_cfg_scale=1.0)
        assert "\n" not in str(e.value)
        pipe.vae = vae
    finally:
        pipe.text_encoder = encoder


@pytest.mark.slow
def test_batches_and_images_per_prompt(repos):
    """Edit-Plus with two prompts × two images each (diffusers refuses batches): every image equals the
    same prompt and noise sampled alone."""
    repo, pipe = repos("edit_plus")
    images = IMAGES["edit_plus"]
    w, h = plan_sizes(images, "edit_plus", vae_area=P.VAE_AREA).output
    noise = np.random.default_rng(4).standard_normal((4, (h // 16) * (w // 16), 64), dtype=np.float32)
    prompts = [PROMPT, "turn it into a pencil sketch"]
    out = pipe(image=images, prompt=prompts, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
               num_images_per_prompt=2, latents=noise, output_type="np").images
    assert out.shape == (4, h, w, 3)
    for i in (0, 3):  # rows are (prompt 0, prompt 0, prompt 1, prompt 1)
        alone = pipe(image=images, prompt=prompts[i // 2], negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     latents=noise[i:i + 1], output_type="np").images
        assert_close(out[i], alone[0], 2e-5, f"batch row {i} vs alone")  # measured ≤ 1.2e-6


def test_sizes_follow_diffusers():
    """The resize plan and the output flooring at the real areas, against diffusers' own functions."""
    from PIL import Image

    for w, h in [(1024, 1024), (1200, 900), (640, 1136), (333, 777), (4000, 3000)]:
        im = Image.new("RGB", (w, h))
        cw, ch, _ = hf_edit.calculate_dimensions(1024 * 1024, w / h)
        plan = plan_sizes([im], "edit")
        assert plan.condition == plan.vae == ((cw, ch),) and plan.output == (cw, ch)
        plus = plan_sizes([Image.new("RGB", (500, 300)), im], "edit_plus")
        assert plus.condition[1] == hf_plus.calculate_dimensions(384 * 384, w / h)
        assert plus.vae[1] == hf_plus.calculate_dimensions(1024 * 1024, w / h)
        assert plus.output == hf_plus.calculate_dimensions(1024 * 1024, w / h)  # the last image's
    assert output_dims(None, None, (1248, 832), 16) == (832, 1248)
    with pytest.warns(UserWarning, match="not a multiple of 16"):
        assert output_dims(1000, 1010, (0, 0), 16) == (992, 1008)
    for bad in (8, 0, -32, 100.0):
        with pytest.raises(ValueError, match="height must be an integer of at least 16"):
            output_dims(bad, 64, (64, 64), 16)


def test_cfg_follows_diffusers_defaults(repos):
    """No negative prompt → no CFG, with diffusers' warning; negative prompt without scale > 1 → warning too."""
    repo, pipe = repos("edit")
    kw = dict(image=IMAGES["edit"][0], prompt=PROMPT, num_inference_steps=STEPS, seed=1, output_type="latent")
    with pytest.warns(UserWarning, match="classifier-free guidance is off since no negative_prompt"):
        a = pipe(**kw).images  # default true_cfg_scale 4.0, negative_prompt None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = pipe(**kw, true_cfg_scale=1.0).images
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.warns(UserWarning, match="true_cfg_scale <= 1"):
        pipe(**kw, true_cfg_scale=1.0, negative_prompt=NEGATIVE)


def test_bad_inputs_say_so(repos):
    repo, pipe = repos("edit")
    image = IMAGES["edit"][0]
    cases = [
        (dict(image=None, prompt=PROMPT), ValueError, "need an input image"),
        (dict(image="a.png", prompt=PROMPT), TypeError, "PIL images or uint8"),
        (dict(image=image, prompt=None), ValueError, "exactly one of prompt and prompt_embeds"),
        (dict(image=[image, image], prompt=[PROMPT] * 3), ValueError, "one image, or one per prompt"),
        (dict(image=image, prompt=PROMPT, latents=np.zeros((1, 5, 64), np.float32)), ValueError, "packed noise"),
        (dict(image=image, prompt=PROMPT, output_type="pt"), ValueError, "output_type"),
        (dict(image=image, prompt=PROMPT, height=8), ValueError, "at least 16"),
        (dict(image=image, prompt=PROMPT, max_sequence_length=2048), ValueError, "max_sequence_length"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match) as e:
            pipe(num_inference_steps=1, true_cfg_scale=1.0, **kw)
        assert "\n" not in str(e.value)


def test_loading_options(parts, repos, tmp_path):
    """transformer= a single file (repo config used) or a loaded model, lora= merged; components=; errors."""
    repo, pipe = repos("2511")
    model_file = os.path.join(repo.root, "transformer", "diffusion_pytorch_model.safetensors")
    os.symlink(model_file, tmp_path / "dit.safetensors")
    d, r = P.DIT.inner_dim, 2
    g = np.random.default_rng(0)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": g.standard_normal((r, d), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": g.standard_normal((d, r), np.float32)},
              tmp_path / "lora.safetensors")
    one = QwenImageEditPipeline.from_pretrained(
        repo.root, dtype=jnp.float32, transformer=tmp_path / "dit.safetensors", components=("transformer",),
        lora=[(tmp_path / "lora.safetensors", 0.5)])
    assert one.text_encoder is None and one.vae is None and one.transformer.config.zero_cond_t
    base = pipe.transformer.transformer_blocks.attn.to_qkv.kernel.get_value()
    merged = one.transformer.transformer_blocks.attn.to_qkv.kernel.get_value()
    diff = np.abs(np.asarray(merged) - np.asarray(base)).reshape(len(merged), -1).max(axis=1)
    assert diff[0] > 1e-3 and diff[1:].max() == 0  # block 0 only
    given = QwenImageEditPipeline.from_pretrained(repo.root, transformer=one.transformer, components=("transformer",))
    assert given.transformer is one.transformer and given.variant == "edit_plus"
    not_2511 = load_transformer(model_file, config=P.dit_config("edit_plus"))  # zero_cond_t off
    with pytest.warns(UserWarning, match="zero_cond_t=False but .* says True"):
        QwenImageEditPipeline.from_pretrained(repo.root, transformer=not_2511, components=("transformer",))

    with pytest.raises(CheckpointError, match="model_index.json: not found"):
        pipeline_variant(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(ValueError, match="not an edit pipeline"):
        QwenImageEditPipeline.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        QwenImageEditPipeline.from_pretrained(repo.root, transformer=tmp_path / "nope", components=("transformer",))
    with pytest.raises(ValueError, match="unknown components"):
        QwenImageEditPipeline.from_pretrained(repo.root, components=("unet",))


def test_scheduler_config(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text('{"base_shift": 0.5, "max_shift": 0.9, "max_image_seq_len": 8192, "shift_terminal": 0.02, '
                    '"use_dynamic_shifting": true}')
    cfg = scheduler_from_json(path)
    assert (cfg.max_shift, cfg.max_image_seq_len, cfg.shift_terminal) == (0.9, 8192, 0.02)
    assert cfg == QWEN_IMAGE_SCHEDULER
    path.write_text('{"use_dynamic_shifting": true}')  # the scheduler class's defaults for the rest
    assert (scheduler_from_json(path).max_shift, scheduler_from_json(path).shift_terminal) == (1.15, None)
    path.write_text("{}")  # the class defaults: a fixed shift (1.0), as diffusers reads it
    assert scheduler_from_json(path).use_dynamic_shifting is False
    path.write_text('{"use_dynamic_shifting": true, "stochastic_sampling": true}')
    with pytest.raises(ValueError, match="stochastic_sampling=true is not supported"):
        scheduler_from_json(path)


def test_lightning_scheduler_matches_diffusers(parts, repos, monkeypatch, tmp_path):
    """Few-step sampling: Qwen-Image-Lightning's scheduler config, 4 steps, true_cfg_scale 1 (no negative
    prompt), given as a file to `from_pretrained(scheduler_config=)`; the same config in diffusers' pipeline."""
    P.small_areas(monkeypatch)
    repo, first = repos("edit_plus")
    config_path = tmp_path / "lightning_scheduler.json"
    config_path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **LIGHTNING}))
    pipe = QwenImageEditPipeline.from_pretrained(repo.root, dtype=jnp.float32, components=("transformer",),
                                                 scheduler_config=config_path)
    pipe.text_encoder, pipe.vae = first.text_encoder, first.vae
    pipe.vae_image_area, pipe.condition_image_area = P.VAE_AREA, P.CONDITION_AREA
    assert pipe.scheduler.shift_terminal is None and pipe.scheduler != first.scheduler
    ref = P.reference_pipeline(parts, repo, scheduler=make_scheduler(LIGHTNING))
    images = IMAGES["edit_plus"]
    w, h = plan_sizes(images, pipe.variant, vae_area=P.VAE_AREA).output
    noise = np.random.default_rng(4).standard_normal((1, (h // 16) * (w // 16), 64), dtype=np.float32)
    with torch.no_grad():
        expected = ref(image=images, prompt=PROMPT, true_cfg_scale=1.0, num_inference_steps=4,
                       latents=torch.from_numpy(noise), output_type="np").images
    out = pipe(image=images, prompt=PROMPT, true_cfg_scale=1.0, num_inference_steps=4, latents=noise,
               output_type="np").images
    assert out.std() > 0.05
    MEASURED["lightning image"] = rel_err(out, expected)
    print(f"\nlightning 4 steps: image {MEASURED['lightning image']:.2e}")
    assert_close(out, expected, IMAGE_TOL, "Lightning config, 4 steps, image")
    # the repo's own schedule gives another image: the config is really used
    default = first(image=images, prompt=PROMPT, true_cfg_scale=1.0, num_inference_steps=4, latents=noise,
                    output_type="np").images
    assert rel_err(default, out) > 1e-3
