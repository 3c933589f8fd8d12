"""The diffusers denoising loop, for sampling parity tests and the sampling benchmark.

`diffusers_edit_loop` is the loop of `QwenImageEditPipeline.__call__` / `QwenImageEditPlusPipeline.__call__`
(steps 5–6: timesteps from `calculate_shift` + `retrieve_timesteps`, the per-step transformer calls,
true CFG with norm rescale, `scheduler.step`), written line for line with the pipelines' own helpers.
`run_edit_plus_pipeline` runs the real `QwenImageEditPlusPipeline.__call__` with the VAE encoder and
the resize rule stubbed, so the loop above can itself be checked against diffusers.
"""

from __future__ import annotations

import math

import numpy as np

from qwen_edit_jax.testing.repo import SCHEDULER_CONFIG

# Qwen/Qwen-Image(-Edit) `scheduler/scheduler_config.json`, without the class and version keys.
QWEN_SCHEDULER_CONFIG = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}


# Qwen-Image-Lightning's published scheduler config (4 / 8 steps, true_cfg_scale 1): see wave3_facts.md
LIGHTNING_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": math.log(3), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def make_scheduler(config: dict | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(QWEN_SCHEDULER_CONFIG if config is None else config)


def diffusers_schedule(num_inference_steps: int, image_seq_len: int,
                       config: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(`scheduler.sigmas`, `scheduler.timesteps`) after the pipelines' timestep set-up, for a scheduler config."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift, retrieve_timesteps

    scheduler = make_scheduler(config)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    retrieve_timesteps(scheduler, num_inference_steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler.sigmas.numpy(), scheduler.timesteps.numpy()


def diffusers_sigmas(num_inference_steps: int, image_seq_len: int) -> np.ndarray:
    """`scheduler.sigmas` after the pipelines' timestep set-up (the Qwen-Image config)."""
    return diffusers_schedule(num_inference_steps, image_seq_len)[0]


def diffusers_edit_loop(
    transformer,
    *,
    latents,
    image_latents,
    prompt_embeds,
    prompt_embeds_mask,
    negative_prompt_embeds=None,
    negative_prompt_embeds_mask=None,
    true_cfg_scale: float = 4.0,
    num_inference_steps: int = 50,
    img_shapes,
    step_callback=None,
):
    """The pipelines' denoising loop; torch tensors in, packed target latents out (torch)."""
    import torch
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift, retrieve_timesteps

    scheduler = make_scheduler()
    has_neg_prompt = negative_prompt_embeds is not None
    do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
    # encode_prompt drops all-ones masks
    if prompt_embeds_mask is not None and prompt_embeds_mask.all():
        prompt_embeds_mask = None
    if negative_prompt_embeds_mask is not None and negative_prompt_embeds_mask.all():
        negative_prompt_embeds_mask = None

    # 5. Prepare timesteps
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    image_seq_len = latents.shape[1]
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, "cpu", sigmas=sigmas, mu=mu)
    guidance = None

    # 6. Denoising loop
    scheduler.set_begin_index(0)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            latent_model_input = latents
            if image_latents is not None:
                latent_model_input = torch.cat([latents, image_latents], dim=1)

            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            noise_pred = transformer(
                hidden_states=latent_model_input,
                timestep=timestep / 1000,
                guidance=guidance,
                encoder_hidden_states_mask=prompt_embeds_mask,
                encoder_hidden_states=prompt_embeds,
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
            noise_pred = noise_pred[:, : latents.size(1)]

            if do_true_cfg:
                neg_noise_pred = transformer(
                    hidden_states=latent_model_input,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    encoder_hidden_states_mask=negative_prompt_embeds_mask,
                    encoder_hidden_states=negative_prompt_embeds,
                    img_shapes=img_shapes,
                    return_dict=False,
                )[0]
                neg_noise_pred = neg_noise_pred[:, : latents.size(1)]
                comb_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)

                cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
                noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
                noise_pred = comb_pred * (cond_norm / noise_norm)

            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if step_callback is not None:
                step_callback(i)
    return latents


def run_edit_plus_pipeline(
    transformer,
    *,
    latents,
    reference_latents,
    prompt_embeds,
    prompt_embeds_mask,
    negative_prompt_embeds,
    negative_prompt_embeds_mask,
    true_cfg_scale: float,
    num_inference_steps: int,
    monkeypatch,
):
    """The real `QwenImageEditPlusPipeline.__call__` (batch 1) with output_type='latent'.

    `reference_latents`: unpacked normalised latents [1, 16, h, w] per reference. The pipeline's VAE
    encode is replaced by a lookup of these latents, and `calculate_dimensions` by one returning each
    reference's pixel size (the real one forces ~1 MP, too big for a CPU test). Everything else —
    packing, img_shapes, masks, scheduler, CFG, stepping — is diffusers' own code.
    """
    import PIL.Image
    import torch
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    sizes = [(r.shape[3] * 8, r.shape[2] * 8) for r in reference_latents]  # (width, height) pixels
    ratios = {w / h: (w, h) for w, h in sizes}
    if len(ratios) != len(sizes):
        raise ValueError("references need distinct aspect ratios for the stubbed calculate_dimensions")
    monkeypatch.setattr(plus, "calculate_dimensions", lambda area, ratio: ratios[ratio])
    by_size = {(h, w): r for (w, h), r in zip(sizes, reference_latents)}

    pipe = plus.QwenImageEditPlusPipeline(
        scheduler=make_scheduler(), vae=None, text_encoder=None, tokenizer=None, processor=None,
        transformer=transformer,
    )
    pipe._encode_vae_image = lambda image, generator: by_size[tuple(image.shape[-2:])][:, :, None]
    images = [PIL.Image.new("RGB", s) for s in sizes]
    n_target = latents.shape[1]
    h_tok = round(float(np.sqrt(n_target)))  # callers use a square target
    with torch.no_grad():
        out = pipe(
            image=images,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_embeds_mask=negative_prompt_embeds_mask,
            true_cfg_scale=true_cfg_scale,
            num_inference_steps=num_inference_steps,
            height=h_tok * 16,
            width=h_tok * 16,
            latents=latents,
            output_type="latent",
            return_dict=False,
        )[0]
    return out
