"""The demo's LoRA effect on held-out edit samples, for a LoRA trained on a float base and on a quantized one.

    python benchmarks/quant_demo_eval.py --run fp32=runs/demo --run int8=runs/demo_int8 --json

Held-out samples: the latent demo's generator (`testing.latent.LatentDemo()`, the settings that wrote
its cache) continued past the training set (`num_samples` … + `--held-out`): the same instructions, new reference images and prompt noise. Each run's LoRA is
loaded into adapters on the base it was trained with (that run's `run.json` model options, so
`model.quantize` too) and scored by the flow-matching MSE at fixed σ ∈ {0.25, 0.5, 0.75} with
fixed noise, with the adapters on and off (B = 0). The last line with `--json` is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="name=run folder (run.json + lora_diffusers.safetensors)")
    p.add_argument("--held-out", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from qwen_edit_jax.loading import load_transformer
    from qwen_edit_jax.lora.adapters import load_lora_into_adapters
    from qwen_edit_jax.packing import pack_latents
    from qwen_edit_jax.training.config import config_from_dict
    from qwen_edit_jax.testing.latent import LatentDemo, demo_samples

    result = {}
    for spec in args.run:
        name, folder = spec.split("=", 1)
        with open(os.path.join(folder, "run.json")) as f:
            d = json.load(f)
        d.pop("run_info", None)
        cfg = config_from_dict(d, source=folder)
        trained = LatentDemo()
        demo = dataclasses.replace(trained, num_samples=trained.num_samples + args.held_out)
        opts = cfg.model_options()
        model = load_transformer(cfg.model.path, options=opts, progress=False)
        held = list(demo_samples(demo, model.config.out_channels, model.config.joint_attention_dim))[trained.num_samples:]
        sigmas = (0.25, 0.5, 0.75)

        def mse(m):
            errs = []
            for s in held:
                c, h, w = s.target.shape
                x0 = pack_latents(jnp.asarray(s.target)[None])
                ref = pack_latents(jnp.asarray(s.references[0])[None])
                txt = jnp.asarray(s.prompt_embeds)[None]
                mask = jnp.asarray(s.prompt_mask)[None]
                shapes = [(1, h // 2, w // 2)] * 2
                for sg in sigmas:
                    noise = jnp.asarray(np.random.default_rng(hash((s.sample_id, sg)) % 2**32)
                                        .standard_normal(x0.shape), jnp.float32)
                    xt = (1 - sg) * x0 + sg * noise
                    pred = m(jnp.concatenate([xt, ref], 1), txt, mask, jnp.asarray([sg], jnp.float32), [shapes])
                    errs.append(float(jnp.mean(jnp.square(pred[:, : x0.shape[1]].astype(jnp.float32) - (noise - x0)))))
            return float(np.mean(errs))

        base_mse = mse(model)  # fresh adapters: B = 0, no effect
        load_lora_into_adapters(model, os.path.join(folder, "lora_diffusers.safetensors"))
        lora_mse = mse(model)
        result[name] = {"quantize": opts.quantize, "held_out_mse_no_lora": base_mse, "held_out_mse_lora": lora_mse,
                        "held_out_samples": len(held)}
        print(f"{name:6s} quantize={opts.quantize}  held-out MSE without LoRA {base_mse:.4f}  with LoRA {lora_mse:.4f}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
