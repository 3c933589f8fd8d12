"""Sampling: the flow-match schedule (`schedule`), the compiled true-CFG loop (`loop`), cached examples (`cached`)."""

from .cached import (
    SampleSettings,
    cfg_scale_used,
    latent_img_shape,
    output_name,
    plan_batches,
    plan_outputs,
    sample_cached,
    sample_cached_batch,
    sample_dataset,
    sample_noise,
    save_latents,
    validation_distance,
)
from .loop import default_batch_cfg, sample, sharded_forward
from .schedule import (
    DIFFUSERS_DEFAULTS,
    QWEN_IMAGE_SCHEDULER,
    FlowMatchConfig,
    as_scheduler_config,
    calculate_shift,
    cfg_combine,
    euler_step,
    exponential_shift,
    flow_match_sigmas,
    model_timesteps,
    read_scheduler_config,
    scheduler_config_from_dict,
    stretch_to_terminal,
)

__all__ = [
    "DIFFUSERS_DEFAULTS", "QWEN_IMAGE_SCHEDULER", "as_scheduler_config", "read_scheduler_config",
    "scheduler_config_from_dict", "FlowMatchConfig", "SampleSettings", "calculate_shift", "cfg_combine",
    "cfg_scale_used",
    "default_batch_cfg",
    "euler_step",
    "exponential_shift", "flow_match_sigmas", "latent_img_shape", "model_timesteps", "output_name", "plan_batches",
    "plan_outputs", "sample", "sample_cached", "sample_cached_batch", "sample_dataset", "sample_noise",
    "save_latents", "sharded_forward", "stretch_to_terminal", "validation_distance",
]
