"""Images per second of VAE encode and decode: the JAX 2D network vs diffusers' `AutoencoderKLQwenImage`.

    python benchmarks/vae.py                                  # 512² and 1024², fp32 on CPU, bf16 on GPU/TPU
    python benchmarks/vae.py --sizes 256 --iters 3            # a quick CPU run
    python benchmarks/vae.py --dtype bf16 --batch 4 --no-torch # accelerator, JAX only

Both sides get the same random weights (released architecture, 127M parameters) and the same inputs:
encode = `vae.encode(x[:, :, None]).latent_dist.mode()` on [B, 3, S, S] in [-1, 1] (JAX: `vae.encode`,
which also normalises); decode = `vae.decode(z[:, :, None]).sample` on [B, 16, S/8, S/8] (JAX:
`vae.decode`). ratio = torch seconds / JAX seconds (> 1: JAX is faster). JAX's compiled temp memory
(`memory_analysis`) is reported per size. Timings: median over iterations in which other processes
took ≤ 5% of the machine (`_timing.time_fn`). Last line: JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _timing import emit_json, print_table, time_fn  # noqa: E402

from qwen_edit_jax.config import as_dtype  # noqa: E402
from qwen_edit_jax.loading.vae import vae_from_tensors  # noqa: E402
from qwen_edit_jax.models.vae import VAEConfig  # noqa: E402


def torch_model(dtype_name: str, seed: int = 0):
    """diffusers' VAE with random weights (no default init: meta device, then filled)."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        model = AutoencoderKLQwenImage()
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                scale = 0.1 if p.ndim == 1 else 1 / np.sqrt(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    return model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]).eval(), state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024", help="comma-separated square image sizes (multiples of 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 elsewhere")
    ap.add_argument("--attention", default="chunked", help="kernel name for the mid-block attention")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-torch", action="store_true", help="time JAX only")
    args = ap.parse_args()
    backend = jax.default_backend()
    dtype_name = args.dtype or ("fp32" if backend == "cpu" else "bf16")
    sizes = [int(s) for s in args.sizes.split(",")]

    import torch

    ref, state = torch_model(dtype_name)
    vae = vae_from_tensors(state, VAEConfig(), dtype=as_dtype(dtype_name), attention=args.attention)
    tdt = next(ref.parameters()).dtype
    rows = []
    for size in sizes:
        rng = np.random.default_rng(size)
        x = rng.uniform(-1, 1, (args.batch, 3, size, size)).astype(np.float32)
        z = rng.standard_normal((args.batch, 16, size // 8, size // 8)).astype(np.float32)
        xj, zj = jnp.asarray(x), jnp.asarray(z)
        xt, zt = torch.from_numpy(x).to(tdt)[:, :, None], torch.from_numpy(z).to(tdt)[:, :, None]
        for op in ("encode", "decode"):
            if op == "encode":
                jfn = lambda x=xj: vae.encode(x).block_until_ready()  # noqa: E731
                tfn = lambda x=xt: ref.encode(x).latent_dist.mode()  # noqa: E731
            else:
                jfn = lambda z=zj: vae.decode(z).block_until_ready()  # noqa: E731
                tfn = lambda z=zt: ref.decode(z).sample  # noqa: E731
            mem = vae.lower(op, x.shape if op == "encode" else z.shape).compile().memory_analysis()
            j = time_fn(jfn, iters=args.iters, warmup=args.warmup)
            row = {"size": size, "op": op, "jax_s": j["median_s"], "jax_clean": j["clean"],
                   "jax_img_per_s": args.batch / j["median_s"], "jax_temp_gib": mem.temp_size_in_bytes / 2**30}
            if not args.no_torch:
                with torch.no_grad():
                    t = time_fn(tfn, iters=args.iters, warmup=args.warmup)
                row.update(torch_s=t["median_s"], torch_clean=t["clean"], torch_img_per_s=args.batch / t["median_s"],
                           ratio=t["median_s"] / j["median_s"])
            rows.append(row)
            print_table([row], list(row))
    print()
    print_table(rows, ["size", "op", "jax_s", "torch_s", "ratio", "jax_img_per_s", "jax_temp_gib", "jax_clean",
                       "torch_clean"])
    emit_json({"benchmark": "vae", "backend": backend, "device": str(jax.devices()[0].device_kind),
               "dtype": dtype_name, "batch": args.batch, "attention": args.attention, "cpu": platform.processor(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "loadavg_1m": os.getloadavg()[0], "rows": rows})


if __name__ == "__main__":
    main()
