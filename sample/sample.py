#!/usr/bin/env python
"""Sample edit targets from a training cache with a base model plus optional LoRA files.

    python sample/sample.py --cache data/cache --model Qwen-Image-Edit-2509/transformer \
        --lora runs/demo/lora_diffusers.safetensors:0.8 --out samples/ [--steps 50] [--cfg 4.0] \
        [--seed 0] [--batch-size 1] [--dtype bf16] [--ids ID ...] [--limit N] [--mesh 1,-1,1]

Reads cached prompt embeddings and reference latents (`qwen_edit_jax.training.data` format) and
writes OUT/<sample id>.safetensors per sample: `latents` [16, h, w], the normalised VAE latent (the
same space as the cache's `target`; decode with z·std + mean and the VAE). `--model` is a diffusers
transformer folder, a safetensors file (with --config), or a merged checkpoint from convert/.
Exit codes: 0 done, 2 bad input (message names the file/key/value at fault).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_lora(spec: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' → (path, scale)."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def parse_mesh(spec: str) -> tuple[int, int, int]:
    try:
        data, fsdp, tensor = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--mesh must be DATA,FSDP,TENSOR (e.g. 1,-1,1), got {spec!r}") from None
    return data, fsdp, tensor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cache", required=True, help="cached dataset folder (manifest.json + shards)")
    p.add_argument("--model", required=True, help="base transformer: diffusers folder, safetensors file, merged ckpt")
    p.add_argument("--config", help="config.json for a single-file --model")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA file to merge (any supported key style); repeat for several")
    p.add_argument("--out", required=True, help="output folder for <sample id>.safetensors files")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (diffusers default 50)")
    p.add_argument("--cfg", type=float, default=4.0, help="true CFG scale; used when the cache has negative prompts")
    p.add_argument("--seed", type=int, default=0, help="noise seed (noise also depends on the sample id)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward (grouped by image layout)")
    p.add_argument("--separate-cfg", action="store_true", help="run cond/uncond one after the other (less memory)")
    p.add_argument("--dtype", default="bf16", help="weights and activations: bf16 or float32")
    p.add_argument("--attention", default="xla", help="attention kernel: xla, chunked, cudnn, splash")
    p.add_argument("--ids", nargs="+", help="only these sample ids")
    p.add_argument("--limit", type=int, help="only the first N selected samples")
    p.add_argument("--mesh", help="DATA,FSDP,TENSOR device mesh (-1 = the remaining devices)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--skip-existing", action="store_true", help="keep existing output files, sample the rest")
    args = p.parse_args(argv)

    from qwen_edit_jax import loading, parallel, sampling
    from qwen_edit_jax.config import DiTConfig, ModelOptions, as_dtype
    from qwen_edit_jax.training.data import CachedDataset, DataError
    from qwen_edit_jax.weights.safetensors_io import CheckpointError

    try:
        dataset = CachedDataset(args.cache)
        indices = list(range(len(dataset)))
        if args.ids:
            by_id = {info.sample_id: info.index for info in dataset.infos}
            missing = [i for i in args.ids if i not in by_id]
            if missing:
                raise DataError(f"{args.cache}: no samples with ids {missing[:5]}")
            indices = [by_id[i] for i in args.ids]
        if args.limit is not None:
            indices = indices[: args.limit]
        sampling.plan_outputs(dataset, indices, args.out, overwrite=args.overwrite,
                              skip_existing=args.skip_existing)  # fail fast, before loading weights
        settings = sampling.SampleSettings(num_inference_steps=args.steps, true_cfg_scale=args.cfg, seed=args.seed,
                                           batch_size=args.batch_size, batch_cfg=not args.separate_cfg)
        dtype = as_dtype(args.dtype)
        options = ModelOptions(param_dtype=dtype, dtype=dtype, attention=args.attention)
        loras = [parse_lora(s) for s in args.lora]
        for path, _ in loras:
            if not os.path.exists(path):
                raise FileNotFoundError(f"LoRA file not found: {path}")
        config = DiTConfig.from_json(args.config) if args.config else None
        mesh = None
        if args.mesh:
            mesh = parallel.make_mesh(*parse_mesh(args.mesh))
        model = loading.load_transformer(args.model, options=options, config=config, lora=loras or None, mesh=mesh)
        written = sampling.sample_dataset(
            model, dataset, args.out, settings=settings, indices=indices, overwrite=args.overwrite,
            skip_existing=args.skip_existing, mesh=mesh,
            metadata={"model": os.path.abspath(args.model), "cache": os.path.abspath(args.cache),
                      "loras": ";".join(f"{os.path.abspath(p)}:{s}" for p, s in loras), "dtype": str(dtype)})
    except (DataError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {len(written)} samples in {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
