"""Flow-matching objective and timestep samplers against diffusers' scheduler and DiffSynth's published formulas."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_edit_jax.training.config import ObjectiveSection
from qwen_edit_jax.training.objective import (
    bell_weights,
    flow_matching_loss,
    qwen_training_sigmas,
    resolution_mu,
    sample_timesteps,
    timestep_table,
)
from tests.compare import assert_close
from tests.sampling_reference import QWEN_SCHEDULER_CONFIG, make_scheduler


def _diffusers_qwen_scheduler():
    """diffusers' scheduler with Qwen-Image's released `scheduler_config.json`."""
    return make_scheduler()


def diffsynth_qwen_training(n: int = 1000, mu: float = 0.8, shift_terminal: float = 0.02):
    """DiffSynth-Studio's Qwen-Image training schedule, re-derived here from its published source, in float32
    as DiffSynth computes it (torch's default dtype). Source: modelscope/DiffSynth-Studio,
    diffsynth/diffusion/flow_match.py (commit 038bad0100cfc096867bf00522025feff48dc050):
    `FlowMatchScheduler.set_timesteps_qwen_image` — σ = linspace(1, 0, n+1) without the last point,
    σ ← e^μ / (e^μ + 1/σ − 1) with μ = 0.8 when no shift length is given, then 1 − σ rescaled so the
    last σ is shift_terminal = 0.02; timesteps t = 1000·σ — and `set_training_weight` (n = 1000):
    w = exp(−2((t − 500)/1000)²), minus its minimum, scaled to sum 1000 (mean 1).
    diffsynth/diffusion/loss.py (commit 0e6976a0ae1e21062f697e294042d4edab8c581f), `FlowMatchSFTLoss`:
    the timestep index is `torch.randint(0, len(timesteps))` (uniform over the grid) and the MSE is
    multiplied by that timestep's weight. Returns (σ, w), float32, σ descending."""
    f = np.float32
    sigma = np.linspace(1.0, 0.0, n + 1, dtype=f)[:-1]
    e_mu = f(math.exp(mu))
    sigma = e_mu / (e_mu + (f(1) / sigma - f(1)))
    one_minus = f(1) - sigma
    sigma = f(1) - one_minus / (one_minus[-1] / f(1 - shift_terminal))
    t = sigma * f(1000)
    y = np.exp(f(-2) * ((t - f(500)) / f(1000)) ** 2)
    y = y - y.min()
    return sigma, y * (f(1000) / y.sum())


def test_diffsynth_grid_equals_diffusers_qwen_schedule_at_mu_08():
    """DiffSynth trains on the Qwen-Image inference schedule with 1000 steps and μ = 0.8."""
    sched = _diffusers_qwen_scheduler()
    sched.set_timesteps(1000, mu=0.8)
    ref = sched.sigmas.numpy()[:-1].astype(np.float64)  # drop the appended 0
    ours = qwen_training_sigmas(1000, 0.8, 0.02)
    assert ours.shape == (1000,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert ours[0] == pytest.approx(1.0) and ours[-1] == pytest.approx(0.02)
    # DiffSynth's own formula (float32 there, float64 here: measured 2.7e-6 relative at most, near σ = 0.02
    # where the terminal stretch divides by a float32 difference)
    ds_sigma, _ = diffsynth_qwen_training()
    np.testing.assert_allclose(ours, ds_sigma, rtol=1e-5)
    table = timestep_table(ObjectiveSection(), 4096)
    np.testing.assert_allclose(table.sigmas, ours.astype(np.float32))
    # DiffSynth samples the index uniformly, so the median sampled σ is the grid's median (≈ 0.696)
    assert np.median(table.sigmas) == pytest.approx(float(np.median(ds_sigma)), abs=1e-6)


def test_bell_weights_match_diffsynth_formula():
    sigmas = qwen_training_sigmas(1000, 0.8, 0.02)
    w = bell_weights(sigmas)
    ds_sigma, ds_w = diffsynth_qwen_training()
    np.testing.assert_allclose(w, ds_w, rtol=0, atol=1e-5)  # measured 8.8e-7 (float32 there)
    assert w.mean() == pytest.approx(1.0) and w.min() == pytest.approx(0.0)
    assert w[0] == pytest.approx(0.0) and ds_w[0] == 0.0  # t = 1000 gets zero weight in both
    assert w.max() == pytest.approx(float(ds_w.max()), rel=1e-6)  # ≈ 1.68
    assert np.argmax(w) == np.argmax(ds_w)  # the peak, at t ≈ 500
    table = timestep_table(ObjectiveSection(), 64)
    np.testing.assert_allclose(table.weights, w.astype(np.float32), rtol=1e-6)


def test_uniform_and_logit_normal_use_diffusers_training_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000).sigmas.numpy()
    for kind in ("uniform", "logit_normal"):
        t = timestep_table(ObjectiveSection(timestep_sampling=kind), 4096)
        np.testing.assert_allclose(t.sigmas, ref, rtol=1e-6)
        assert (t.weights == 1).all()
    t = timestep_table(ObjectiveSection(timestep_sampling="uniform", weighting="bell"), 64)
    assert t.weights.max() > 1.5  # weighting can be chosen independently


def test_resolution_shift_mu():
    cfg = ObjectiveSection(timestep_sampling="resolution_shift")
    # the pipelines' calculate_shift with the released scheduler config (μ from 0.5 at 256 tokens to 0.9 at 8192)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

    c = QWEN_SCHEDULER_CONFIG
    for n in (256, 4096, 6889, 8192):  # 1024²: 4096 tokens, 1328²: 6889
        ref = calculate_shift(n, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
        assert resolution_mu(n, cfg) == pytest.approx(ref)
    sched = _diffusers_qwen_scheduler()
    sched.set_timesteps(1000, mu=resolution_mu(4096, cfg))
    np.testing.assert_allclose(timestep_table(cfg, 4096).sigmas, sched.sigmas.numpy()[:-1], rtol=1e-5)
    small, large = timestep_table(cfg, 256).sigmas, timestep_table(cfg, 8192).sigmas
    assert np.median(large) > np.median(small)  # bigger images → more noise


def test_sampled_distributions():
    key = jax.random.key(0)
    n = 20000
    s, w = sample_timesteps(key, n, timestep_table(ObjectiveSection(), 64))
    ds_sigma, ds_w = diffsynth_qwen_training()  # uniform index: median σ and mean weight of the grid
    assert float(jnp.median(s)) == pytest.approx(float(np.median(ds_sigma)), abs=0.02)
    assert float(jnp.mean(w)) == pytest.approx(float(ds_w.mean()), abs=0.03)
    s, w = sample_timesteps(key, n, timestep_table(ObjectiveSection(timestep_sampling="uniform"), 64))
    assert float(jnp.mean(s)) == pytest.approx(0.5, abs=0.01) and float(jnp.min(s)) > 0 and (w == 1).all()
    cfg = ObjectiveSection(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0)
    s, _ = sample_timesteps(key, n, timestep_table(cfg, 64))
    assert float(jnp.mean(s)) == pytest.approx(0.5, abs=0.01)
    assert float(jnp.mean(jnp.abs(s - 0.5) < 0.25)) > 0.65  # concentrated mid-range (uniform: 0.5)
    cfg = dataclasses.replace(cfg, logit_mean=1.0)
    s, _ = sample_timesteps(key, n, timestep_table(cfg, 64))
    assert float(jnp.mean(s)) < 0.35  # u = sigmoid(z) is an index fraction: larger u → smaller σ


class _Oracle:
    """A stand-in model that knows x0: predicts v = (x_t − x0)/σ on target tokens, junk elsewhere."""

    def __init__(self, x0, refs, n_target, expected_shapes):
        self.x0, self.refs, self.n, self.shapes = x0, refs, n_target, expected_shapes
        self.calls = []

    def __call__(self, *, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes):
        self.calls.append((hidden_states, encoder_hidden_states_mask, img_shapes))
        x_t = hidden_states[:, : self.n]
        v = (x_t - self.x0) / timestep[:, None, None]
        junk = 100.0 + jnp.zeros_like(hidden_states[:, self.n:])
        return jnp.concatenate([v, junk], axis=1)


def test_loss_is_on_target_tokens_with_clean_references():
    rng = np.random.default_rng(0)
    shapes = ((1, 2, 3), (1, 3, 2), (1, 2, 2))
    b, n, m = 3, 6, 10
    x0 = jnp.asarray(rng.standard_normal((b, n, 64)), jnp.float32)
    refs = jnp.asarray(rng.standard_normal((b, m, 64)), jnp.float32)
    batch = {"target": x0, "references": refs, "prompt_embeds": jnp.ones((b, 4, 8)),
             "prompt_mask": jnp.asarray([[1, 1, 0, 0]] * b, bool)}
    oracle = _Oracle(x0, refs, n, shapes)
    table = timestep_table(ObjectiveSection(timestep_sampling="uniform"), n)
    loss, aux = flow_matching_loss(oracle, batch, jax.random.key(1), table, shapes)
    assert float(loss) < 1e-8 and float(aux["mse"]) < 1e-8  # perfect velocity ⇒ zero loss, junk ignored
    hidden, mask, got_shapes = oracle.calls[0]
    assert hidden.shape == (b, n + m, 64) and got_shapes == shapes
    np.testing.assert_array_equal(np.asarray(hidden[:, n:]), np.asarray(refs))  # references ride along clean
    assert not np.allclose(np.asarray(hidden[:, :n]), np.asarray(x0))  # the target is noised
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(batch["prompt_mask"]))

    class Zero(_Oracle):
        def __call__(self, *, hidden_states, **kw):
            return jnp.zeros_like(hidden_states)

    # predicting 0 costs E|ε − x0|² = E|ε|² + E|x0|² ≈ 2 per element (unweighted)
    loss0, aux0 = flow_matching_loss(Zero(x0, refs, n, shapes), batch, jax.random.key(2), table, shapes)
    assert float(aux0["mse"]) == pytest.approx(2.0, rel=0.15) and float(loss0) == pytest.approx(float(aux0["mse"]))


@pytest.mark.parametrize("min_weight", [0.0, 0.3])
def test_masked_loss_is_the_numpy_masked_mean(min_weight):
    """The loss with cached masks (through the loader's `collate`) equals Σ w·err / Σ w per sample computed in
    numpy on the unpacked latent grid, w = max(mask, min_weight) on all 16 channels of a latent pixel; a sample
    without a mask weighs everything. The noise is read back from the model's input: ε = (x_σ − (1−σ)·x0) / σ."""
    from qwen_edit_jax.cache_format import CachedSample
    from qwen_edit_jax.training.data import collate

    rng = np.random.default_rng(5)
    c, h, w, m = 16, 4, 6, 6
    mask0 = rng.uniform(0, 1, (h, w)).astype(np.float32)
    mask0[0] = 0.0  # a masked-out row
    samples = [CachedSample(f"s{i}", rng.standard_normal((c, h, w)).astype(np.float32),
                            [rng.standard_normal((c, 2, 6)).astype(np.float32)], np.ones((3, 8), np.float32),
                            np.ones(3, bool), mask=mk) for i, mk in enumerate([mask0, None])]
    batch = {k: jnp.asarray(v) for k, v in collate(samples, 4, masks=True).items()}
    assert batch["loss_mask"].shape == (2, h * w // 4, 4)
    n = h * w // 4
    shapes = ((1, h // 2, w // 2), (1, 1, 3))
    pred = rng.standard_normal((2, n + m // 2, 4 * c)).astype(np.float32)
    seen = {}

    def model(*, hidden_states, timestep, **kw):
        seen["x"], seen["sigma"] = np.asarray(hidden_states[:, :n], np.float64), np.asarray(timestep, np.float64)
        return jnp.asarray(pred)

    table = timestep_table(ObjectiveSection(timestep_sampling="uniform"), n)  # weight 1
    loss, aux = flow_matching_loss(model, batch, jax.random.key(3), table, shapes, min_weight)

    def unpack(tokens):  # diffusers' _unpack_latents: [b, (h/2)(w/2), 4c] → [b, c, h, w]
        t = tokens.reshape(2, h // 2, w // 2, c, 2, 2)
        return t.transpose(0, 3, 1, 4, 2, 5).reshape(2, c, h, w)

    x0 = np.stack([s.target for s in samples]).astype(np.float64)
    s = seen["sigma"][:, None, None, None]
    noise = (unpack(seen["x"]) - (1 - s) * x0) / s
    err = (unpack(pred[:, :n].astype(np.float64)) - (noise - x0)) ** 2
    weights = np.maximum(np.stack([mask0, np.ones((h, w), np.float32)]), min_weight)[:, None]  # [b, 1, h, w]
    per_sample = (weights * err).sum(axis=(1, 2, 3)) / (weights.sum(axis=(1, 2, 3)) * c)
    assert_close(float(loss), per_sample.mean(), 2e-6, "masked loss vs numpy")  # measured 1.9e-7
    assert_close(float(aux["mse"]), per_sample.mean(), 2e-6, "masked mse vs numpy")  # measured 1.9e-7
    # the mask matters: the unmasked mean of the same errors differs
    assert abs(err[0].mean() - per_sample[0]) > 1e-3
