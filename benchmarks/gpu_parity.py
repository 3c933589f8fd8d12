"""Full-width parity against diffusers on a GPU (one or two real-size blocks, random weights).

    python benchmarks/gpu_parity.py --layers 1 --img-tokens 1024 --ref-tokens 1024 --txt-tokens 128 --json

fp32 runs with TF32 off on both sides (torch `allow_tf32=False`, JAX `highest` matmul precision);
bf16 runs are compared with diffusers' own bf16 run, and both with fp32. Needs torch + diffusers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import qwen_edit_jax as q  # noqa: E402
from benchmarks.train_step import grid  # noqa: E402
from tests.compare import rel_err  # noqa: E402
from tests.torch_reference import make_torch_model, save_torch_model  # noqa: E402


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--img-tokens", type=int, default=1024)
    p.add_argument("--ref-tokens", type=int, default=1024)
    p.add_argument("--txt-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = dataclasses.replace(q.preset("qwen-image-edit"), num_layers=args.layers)
    tm = make_torch_model(cfg, seed=0)
    shapes = [grid(args.img_tokens), grid(args.ref_tokens)]
    n = args.img_tokens + args.ref_tokens
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, n, 64)).astype(np.float32)
    e = rng.standard_normal((1, args.txt_tokens, cfg.joint_attention_dim)).astype(np.float32)
    s = np.array([0.62], np.float32)

    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def torch_run(dtype):
        m = tm.to(dev, dtype)
        with torch.no_grad():
            out = m(hidden_states=torch.from_numpy(h).to(dev, dtype),
                    encoder_hidden_states=torch.from_numpy(e).to(dev, dtype),
                    timestep=torch.from_numpy(s).to(dev, dtype), img_shapes=[shapes], return_dict=False)[0]
        return out.float().cpu().numpy()

    result = {"device": jax.devices()[0].device_kind, "layers": args.layers, "tokens": [args.img_tokens,
              args.ref_tokens, args.txt_tokens]}
    with tempfile.TemporaryDirectory() as d:
        save_torch_model(tm, d)  # before any dtype round trip of the torch weights
        ref32 = torch_run(torch.float32)
        ref16 = torch_run(torch.bfloat16)
        del tm
        with jax.default_matmul_precision("highest"):
            m32 = q.load_transformer(d, dtype=jnp.float32)
            out32 = np.asarray(m32(hidden_states=h, encoder_hidden_states=e, timestep=s, img_shapes=[shapes]))
        del m32
        result["fp32_rel_err"] = rel_err(out32, ref32)
        for attn in ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",):
            opts = q.ModelOptions(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, attention=attn)
            m16 = q.load_transformer(d, options=opts)
            out16 = np.asarray(m16(hidden_states=h, encoder_hidden_states=e, timestep=s,
                                   img_shapes=[shapes]).astype(jnp.float32))
            del m16
            result[f"bf16_{attn}_vs_diffusers_bf16"] = rel_err(out16, ref16)
            result[f"bf16_{attn}_vs_fp32"] = rel_err(out16, ref32)
    result["diffusers_bf16_vs_fp32"] = rel_err(ref16, ref32)
    for k, v in result.items():
        print(f"{k:32s} {v}")
    if args.json:
        import json
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
