"""Sampling parity with diffusers: scheduler sigmas (bitwise) and the edit denoising loop (fp32, rel err ≤ 2e-5)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import qwen_edit_jax as q
from qwen_edit_jax import sampling
from tests.sampling_reference import (LIGHTNING_SCHEDULER_CONFIG, QWEN_SCHEDULER_CONFIG, diffusers_edit_loop,
                                      diffusers_schedule, diffusers_sigmas, run_edit_plus_pipeline)
from tests.compare import assert_close, assert_differs, rel_err
from tests.torch_reference import make_torch_model, save_torch_model

# Tolerances ≈ 10× the error measured on 2026-12-07 (2-core CPU; tests/compare.py says how to re-measure).
TOL = 2e-5  # fp32 loop vs diffusers: measured ≤ 1.3e-6
PAD_TOL = 2e-5  # extra masked padding vs none: measured 1.1e-6
BF16_TOL = 5e-2  # bf16 loop vs diffusers' bf16 loop: measured 1.6e-2, 3× (rounding noise, not a precision bar;
#                  the check that ours is nearer diffusers' bf16 than to fp32 is the real one)
TINY = q.preset("tiny")


# ------------------------------------------------------------------ scheduler


@pytest.mark.parametrize("steps", [2, 3, 8, 20, 40, 50])
@pytest.mark.parametrize("hw", [(256, 256), (512, 768), (1024, 1024), (1328, 1328), (1664, 928), (2048, 2048)])
def test_sigmas_equal_diffusers(steps, hw):
    n_tokens = (hw[0] // 16) * (hw[1] // 16)
    ours = sampling.flow_match_sigmas(steps, n_tokens)
    ref = diffusers_sigmas(steps, n_tokens)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
    np.testing.assert_array_equal(ours, ref)  # measured: bitwise equal in every case
    assert ours[-1] == 0.0 and ours[0] == pytest.approx(1.0, abs=1e-6)
    assert ours[-2] == pytest.approx(QWEN_SCHEDULER_CONFIG["shift_terminal"], abs=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_single_step_is_defined():
    """diffusers' terminal stretch gives NaN for one step (0/0); ours skips the stretch: [1, 0]."""
    assert np.isnan(diffusers_sigmas(1, 4096)[0])
    np.testing.assert_array_equal(sampling.flow_match_sigmas(1, 4096), [1.0, 0.0])


@pytest.mark.parametrize("image_seq_len", [256, 4096, 6889, 8192, 16384])
def test_calculate_shift_equals_diffusers(image_seq_len):
    """μ (the exponential time shift) as the pipelines compute it from the scheduler config."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

    c = QWEN_SCHEDULER_CONFIG
    ref = calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                          c["max_shift"])
    assert sampling.calculate_shift(image_seq_len) == pytest.approx(ref, rel=1e-12)


def test_model_timesteps_bf16_rounding():
    """bf16 latents: the model sees t.to(bf16)/1000 as diffusers computes it (0.98696 → 0.98828)."""
    import torch

    sig = sampling.flow_match_sigmas(50, 4096)
    ours = sampling.model_timesteps(sig, jnp.bfloat16)
    ref = ((torch.from_numpy(sig[:-1]) * 1000).to(torch.bfloat16) / 1000).float().numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours[1] == pytest.approx(0.98828, abs=1e-5)
    np.testing.assert_array_equal(sampling.model_timesteps(sig, np.float32),
                                  (torch.from_numpy(sig[:-1]) * 1000 / 1000).numpy())


# FlowMatchEulerDiscreteScheduler configs as diffusers reads them (missing keys: the class's defaults)
SCHEDULER_CONFIGS = {
    "lightning": LIGHTNING_SCHEDULER_CONFIG,  # exponential dynamic shift, μ = ln 3 at every size, no terminal
    "linear_shift": {**QWEN_SCHEDULER_CONFIG, "time_shift_type": "linear", "shift_terminal": 0.1},
    "fixed_shift": {"shift": 3.0},  # use_dynamic_shifting false (the class default)
    "fixed_shift_terminal": {"shift": 2.5, "shift_terminal": 0.05},
    "karras": {**QWEN_SCHEDULER_CONFIG, "use_karras_sigmas": True},
    "exponential": {"shift": 3, "use_exponential_sigmas": True},  # an integer shift, as JSON may hold it
    "beta": {**QWEN_SCHEDULER_CONFIG, "use_beta_sigmas": True},
    "invert": {**QWEN_SCHEDULER_CONFIG, "invert_sigmas": True},
    "class_defaults": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1"},
    "500_train_steps": {**LIGHTNING_SCHEDULER_CONFIG, "num_train_timesteps": 500},
}


@pytest.mark.parametrize("steps", [1, 4, 8, 30])
@pytest.mark.parametrize("name", sorted(SCHEDULER_CONFIGS))
def test_scheduler_configs_equal_diffusers(name, steps):
    """σ grid, scheduler timesteps and the model's timesteps for any scheduler config: bitwise diffusers'."""
    config = SCHEDULER_CONFIGS[name]
    if steps == 1 and config.get("shift_terminal"):
        return  # diffusers' terminal stretch is 0/0 for one step (test_single_step_is_defined)
    n_tokens = (1024 // 16) * (768 // 16)
    ours = sampling.flow_match_sigmas(steps, n_tokens, config=sampling.scheduler_config_from_dict(config, name))
    ref_sigmas, ref_timesteps = diffusers_schedule(steps, n_tokens, config)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
    np.testing.assert_array_equal(ours, ref_sigmas)  # measured: bitwise equal in every case
    n_train = config.get("num_train_timesteps", 1000)
    np.testing.assert_array_equal(ours[:-1] * np.float32(n_train), ref_timesteps)
    # what the pipelines feed the model: timestep.to(latents.dtype) / 1000 (a literal 1000)
    np.testing.assert_array_equal(sampling.model_timesteps(ours, np.float32, n_train), ref_timesteps / 1000)


def test_scheduler_config_errors(tmp_path):
    """Keys diffusers does not know, settings this sampler cannot follow, bad values: one line naming them."""
    from qwen_edit_jax.errors import CheckpointError

    bad = {
        "sigma_min": ({"sigma_min": 0.1}, "unknown key 'sigma_min'"),
        "stochastic": ({"stochastic_sampling": True}, "stochastic_sampling=true is not supported"),
        "two_spacings": ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one of use_karras_sigmas"),
        "time_shift_type": ({"time_shift_type": "cosine"}, "time_shift_type must be"),
        "class": ({"_class_name": "EulerDiscreteScheduler"}, "_class_name 'EulerDiscreteScheduler'"),
        "bool": ({"use_dynamic_shifting": "yes"}, "use_dynamic_shifting must be true or false"),
        "shift": ({"shift": 0}, "shift must be a number > 0"),
    }
    for key, (d, message) in bad.items():
        with pytest.raises(ValueError, match=message) as e:
            sampling.scheduler_config_from_dict(d, "cfg.json")
        assert str(e.value).startswith("cfg.json: ") and "\n" not in str(e.value), key
    path = tmp_path / "scheduler_config.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        sampling.read_scheduler_config(path)
    path.write_text('{"shift": 3.0, "_diffusers_version": "0.35.0"}')
    assert sampling.as_scheduler_config(str(path)) == sampling.as_scheduler_config({"shift": 3.0})
    assert sampling.as_scheduler_config(path).use_dynamic_shifting is False


def test_sigmas_bad_input():
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampling.flow_match_sigmas(0, 256)
    with pytest.raises(ValueError, match="image_seq_len"):
        sampling.flow_match_sigmas(10)


# ------------------------------------------------------------------ loop parity


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(zero_cond_t=False):
        if zero_cond_t not in cache:
            cfg = dataclasses.replace(TINY, zero_cond_t=zero_cond_t)
            tm = make_torch_model(cfg, seed=3 + zero_cond_t)
            cache[zero_cond_t] = (tm, q.load_transformer(save_torch_model(tm, tmp_path_factory.mktemp("ckpt"))))
        return cache[zero_cond_t]

    return get


def _inputs(rng, cfg, img_shapes, batch, pos_len, neg_len, pos_pad=(), neg_pad=()):
    n_t = int(np.prod(img_shapes[0]))
    n_r = sum(int(np.prod(s)) for s in img_shapes[1:])
    noise = rng.standard_normal((batch, n_t, cfg.in_channels), dtype=np.float32)
    refs = rng.standard_normal((batch, n_r, cfg.in_channels), dtype=np.float32) if n_r else None

    def text(length, pads):
        emb = rng.standard_normal((batch, length, cfg.joint_attention_dim), dtype=np.float32)
        mask = np.ones((batch, length), np.int64)
        for b, p in enumerate(pads):
            if p:
                mask[b, -p:] = 0
                emb[b, -p:] = 0.0
        return emb, mask

    return noise, refs, text(pos_len, pos_pad), text(neg_len, neg_pad)


def _ours(jm, noise, refs, pos, neg, shapes, steps, scale, **kw):
    return sampling.sample(
        jm, noise=jnp.asarray(noise), image_latents=None if refs is None else jnp.asarray(refs),
        prompt_embeds=jnp.asarray(pos[0]), prompt_embeds_mask=jnp.asarray(pos[1]),
        negative_prompt_embeds=None if neg is None else jnp.asarray(neg[0]),
        negative_prompt_embeds_mask=None if neg is None else jnp.asarray(neg[1]),
        true_cfg_scale=scale, num_inference_steps=steps, img_shapes=shapes, **kw)


def _ref(tm, noise, refs, pos, neg, shapes, steps, scale):
    import torch

    t = torch.from_numpy
    return diffusers_edit_loop(
        tm, latents=t(noise), image_latents=None if refs is None else t(refs),
        prompt_embeds=t(pos[0]), prompt_embeds_mask=t(pos[1]),
        negative_prompt_embeds=None if neg is None else t(neg[0]),
        negative_prompt_embeds_mask=None if neg is None else t(neg[1]),
        true_cfg_scale=scale, num_inference_steps=steps, img_shapes=shapes).numpy()


TWO_REFS = [(1, 4, 4), (1, 3, 5), (1, 4, 3)]


@pytest.mark.parametrize("batch_cfg", [True, False], ids=["batched_cfg", "separate_cfg"])
def test_edit_loop_true_cfg_matches_diffusers(models, batch_cfg):
    """True CFG, batch 2, two references, padded masks, negative prompt of another length."""
    tm, jm = models()
    noise, refs, pos, neg = _inputs(np.random.default_rng(0), TINY, TWO_REFS, 2, 7, 4, pos_pad=(0, 3), neg_pad=(1, 0))
    shapes = [TWO_REFS] * 2
    ref = _ref(tm, noise, refs, pos, neg, shapes, 6, 4.0)
    ours = _ours(jm, noise, refs, pos, neg, shapes, 6, 4.0, batch_cfg=batch_cfg)
    assert ours.shape == (2, 16, 64)
    assert_close(ours, ref, TOL, f"true-CFG loop, batch_cfg={batch_cfg}")
    assert_differs(noise, ref, 0.1, "noise vs sampled latents")  # the loop really moved the latents


def test_edit_loop_zero_cond_t_matches_diffusers(models):
    """Edit-2511 (zero_cond_t): references modulated with t = 0, inside the CFG loop."""
    tm, jm = models(zero_cond_t=True)
    noise, refs, pos, neg = _inputs(np.random.default_rng(1), TINY, TWO_REFS, 2, 5, 8, pos_pad=(2, 0), neg_pad=(0, 4))
    shapes = [TWO_REFS] * 2
    ref = _ref(tm, noise, refs, pos, neg, shapes, 5, 3.5)
    ours = _ours(jm, noise, refs, pos, neg, shapes, 5, 3.5)
    assert_close(ours, ref, TOL, "zero_cond_t loop")


def test_no_cfg_and_text_to_image_match_diffusers(models):
    """No negative prompt (CFG off) with a reference; and plain text-to-image (no references)."""
    tm, jm = models()
    for shapes in ([(1, 4, 4), (1, 4, 4)], [(1, 5, 3)]):
        noise, refs, pos, _ = _inputs(np.random.default_rng(2), TINY, shapes, 1, 6, 6, pos_pad=(2,))
        ref = _ref(tm, noise, refs, pos, None, [shapes], 4, 1.0)
        ours = _ours(jm, noise, refs, pos, None, [shapes], 4, 1.0)
        assert_close(ours, ref, TOL, f"no-CFG loop {shapes}")


def test_reference_loop_equals_real_edit_plus_pipeline(models, monkeypatch):
    """Guard on the test itself: the hand-written loop equals `QwenImageEditPlusPipeline.__call__`,
    and so does ours (batch 1, two references, true CFG, masked prompts of different lengths)."""
    import torch

    tm, jm = models()
    shapes = [(1, 4, 4), (1, 3, 5), (1, 4, 3)]
    rng = np.random.default_rng(4)
    noise, _, pos, neg = _inputs(rng, TINY, shapes, 1, 7, 5, pos_pad=(2,))
    ref_lat = [rng.standard_normal((1, 16, 2 * h, 2 * w), dtype=np.float32) for _, h, w in shapes[1:]]
    refs = np.concatenate([np.asarray(q.pack_latents(r)) for r in ref_lat], axis=1)
    t = torch.from_numpy
    real = run_edit_plus_pipeline(
        tm, latents=t(noise), reference_latents=[t(r) for r in ref_lat], prompt_embeds=t(pos[0]),
        prompt_embeds_mask=t(pos[1]), negative_prompt_embeds=t(neg[0]), negative_prompt_embeds_mask=t(neg[1]),
        true_cfg_scale=4.0, num_inference_steps=4, monkeypatch=monkeypatch).numpy()
    loop = _ref(tm, noise, refs, pos, neg, [shapes], 4, 4.0)
    ours = _ours(jm, noise, refs, pos, neg, [shapes], 4, 4.0)
    assert np.array_equal(real, loop)
    assert_close(ours, real, TOL, "loop vs the real Edit-Plus pipeline")


def test_padding_is_exact(models):
    """Extra zero padding with masked keys leaves the batched-CFG result unchanged."""
    _, jm = models()
    shapes = [(1, 4, 4), (1, 4, 4)]
    noise, refs, pos, neg = _inputs(np.random.default_rng(5), TINY, shapes, 1, 6, 6)
    a = _ours(jm, noise, refs, pos, neg, [shapes], 3, 4.0)
    pad_emb = np.concatenate([pos[0], np.zeros((1, 5, pos[0].shape[2]), np.float32)], axis=1)
    pad_mask = np.concatenate([pos[1], np.zeros((1, 5), np.int64)], axis=1)
    b = _ours(jm, noise, refs, (pad_emb, pad_mask), neg, [shapes], 3, 4.0)
    assert_close(b, a, PAD_TOL, "extra padded prompt vs unpadded")


def test_bad_inputs(models):
    _, jm = models()
    shapes = [(1, 4, 4), (1, 4, 4)]
    noise, refs, pos, neg = _inputs(np.random.default_rng(6), TINY, shapes, 1, 6, 6)
    with pytest.raises(ValueError, match=r"img_shapes\[0\]"):
        _ours(jm, noise, refs, pos, neg, [[(1, 2, 4), (1, 4, 6)]], 2, 4.0)
    with pytest.raises(ValueError, match="describe"):
        _ours(jm, noise, refs, pos, neg, [[(1, 4, 4)]], 2, 4.0)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        _ours(jm, noise, refs, pos, (neg[0][..., :8], neg[1]), [shapes], 2, 4.0)
    with pytest.warns(UserWarning, match="CFG is off"):
        _ours(jm, noise, refs, pos, None, [shapes], 1, 4.0)


def copy_to_bf16(tm):
    """A bf16 copy of the torch model (the fixture's fp32 model stays untouched)."""
    import copy

    import torch

    return copy.deepcopy(tm).to(torch.bfloat16)


def test_bf16_loop_tracks_diffusers_bf16(models, tmp_path):
    """bf16 (weights, activations, latents between steps): our loop stays closer to diffusers' bf16 loop
    than either is to the fp32 result, i.e. the bf16 rounding points (σ seen by the model, latent cast
    after every step) are the same ones."""
    import torch

    tm, _ = models()
    j16 = q.load_transformer(save_torch_model(tm, tmp_path), dtype=jnp.bfloat16)
    noise, refs, pos, neg = _inputs(np.random.default_rng(0), TINY, TWO_REFS, 2, 7, 4, pos_pad=(0, 3), neg_pad=(1, 0))
    shapes = [TWO_REFS] * 2
    ref32 = _ref(tm, noise, refs, pos, neg, shapes, 6, 4.0)
    tb = torch.from_numpy
    bf = lambda a: tb(a).to(torch.bfloat16)
    ref16 = diffusers_edit_loop(
        copy_to_bf16(tm), latents=bf(noise), image_latents=bf(refs), prompt_embeds=bf(pos[0]),
        prompt_embeds_mask=tb(pos[1]), negative_prompt_embeds=bf(neg[0]), negative_prompt_embeds_mask=tb(neg[1]),
        true_cfg_scale=4.0, num_inference_steps=6, img_shapes=shapes).float().numpy()
    ours = sampling.sample(
        j16, noise=jnp.asarray(noise, jnp.bfloat16), image_latents=jnp.asarray(refs, jnp.bfloat16),
        prompt_embeds=jnp.asarray(pos[0], jnp.bfloat16), prompt_embeds_mask=jnp.asarray(pos[1]),
        negative_prompt_embeds=jnp.asarray(neg[0], jnp.bfloat16), negative_prompt_embeds_mask=jnp.asarray(neg[1]),
        true_cfg_scale=4.0, num_inference_steps=6, img_shapes=shapes)
    assert ours.dtype == jnp.bfloat16
    ours = np.asarray(ours, np.float32)
    assert rel_err(ours, ref16) <= 0.5 * rel_err(ref16, ref32)
    assert_close(ours, ref16, BF16_TOL, "bf16 loop vs diffusers bf16")


def test_unmasked_equal_length_prompts_match_diffusers(models):
    """No masks at all and equal prompt lengths: the batched pass runs without a mask."""
    import torch

    tm, jm = models()
    shapes = [(1, 4, 4), (1, 4, 4)]
    noise, refs, pos, neg = _inputs(np.random.default_rng(7), TINY, shapes, 1, 6, 6)
    t = torch.from_numpy
    ref = diffusers_edit_loop(tm, latents=t(noise), image_latents=t(refs), prompt_embeds=t(pos[0]),
                              prompt_embeds_mask=None, negative_prompt_embeds=t(neg[0]),
                              negative_prompt_embeds_mask=None, true_cfg_scale=4.0, num_inference_steps=3,
                              img_shapes=[shapes]).numpy()
    ours = sampling.sample(jm, noise=jnp.asarray(noise), image_latents=jnp.asarray(refs),
                           prompt_embeds=jnp.asarray(pos[0]), prompt_embeds_mask=None,
                           negative_prompt_embeds=jnp.asarray(neg[0]), negative_prompt_embeds_mask=None,
                           true_cfg_scale=4.0, num_inference_steps=3, img_shapes=[shapes])
    assert_close(ours, ref, TOL, "unmasked loop")


def test_cfg_mode_default_is_per_platform():
    """batch_cfg=None: two passes on CPU (measured faster there, README "Measured"), one 2B batch on
    accelerators, including a TPU mesh being AOT-compiled from a CPU host."""
    from types import SimpleNamespace

    assert sampling.default_batch_cfg() is False  # this suite runs on CPU
    tpu_mesh = SimpleNamespace(abstract_device=SimpleNamespace(platform="tpu"))
    gpu_mesh = SimpleNamespace(abstract_device=SimpleNamespace(platform="gpu"))
    assert sampling.default_batch_cfg(tpu_mesh) is True and sampling.default_batch_cfg(gpu_mesh) is True
