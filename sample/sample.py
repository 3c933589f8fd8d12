#!/usr/bin/env python
r"""Sample edit targets from a training cache, or edit images into PNGs, with a base model plus optional LoRAs.

    python sample/sample.py --cache data/cache --model Qwen-Image-Edit-2509/transformer \
        --lora runs/demo/lora_diffusers.safetensors:0.8 --out samples/ [--steps 50] [--cfg 4.0] \
        [--seed 0] [--batch-size 1] [--dtype bf16] [--ids ID ...] [--limit N] [--mesh 1,-1,1] \
        [--scheduler-config scheduler_config.json]

Reads cached prompt embeddings and reference latents (`qwen_edit_jax.cache_format`) and
writes OUT/<sample id>.safetensors per sample: `latents` [16, h, w], the normalised VAE latent (the
same space as the cache's `target`; decode with z·std + mean and the VAE). `--model` is a diffusers
transformer folder, a safetensors file (with --config), or a merged checkpoint from convert/.
`--cfg` needs cached negative prompts: samples without one are sampled at scale 1 (a warning says so),
and each file's header records the scale actually used. When `--model` is a diffusers repo folder
(with `transformer/` and `vae/`), its transformer is used and every sample is also decoded to
OUT/<sample id>.png next to its latents.

Edit images (a diffusers Qwen-Image-Edit / -2509 / -2511 repo folder; PNGs out):

    python sample/sample.py --model checkpoints/Qwen-Image-Edit-2509 --lora my_lora.safetensors:0.8 \
        --image a.png [--image b.png] --prompt "put the cat on the sofa" --out samples/ \
        [--negative-prompt " "] [--steps 50] [--cfg 4.0] [--seed 0] [--height H --width W] [--resolution 1024] \
        [--num-images N] [--scheduler-config scheduler_config.json]

writes OUT/<first image's name>-<seed>[-<k>].png (settings in the PNG text chunks). The text encoder
and VAE are loaded first, the prompts encoded, the text encoder released, then the transformer loaded.
--scheduler-config: another FlowMatchEulerDiscreteScheduler config (few-step LoRAs such as Qwen-Image-Lightning:
their config, --steps 4 or 8, --cfg 1); default: the repo's scheduler/scheduler_config.json.
Exit codes: 0 done, 2 bad input (message names the file/key/value at fault).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_lora(spec: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' → (path, scale); a SCALE that is not a number is an error."""
    from qwen_edit_jax.lora.merge import parse_lora_spec

    return parse_lora_spec(spec)


def parse_mesh(spec: str) -> tuple[int, int, int]:
    try:
        data, fsdp, tensor = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--mesh must be DATA,FSDP,TENSOR (e.g. 1,-1,1), got {spec!r}") from None
    return data, fsdp, tensor


def main(argv: list[str] | None = None) -> int:
    description, epilog = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog)
    p.add_argument("--cache", help="cached dataset folder (manifest.json + shards): sample its examples")
    p.add_argument("--image", action="append", default=[], metavar="PNG",
                   help="input image to edit (repeat for Edit-Plus references, in order); needs --prompt")
    p.add_argument("--model", required=True, help="diffusers repo folder (image mode: required), or with --cache a "
                   "transformer: diffusers folder, safetensors file, merged ckpt (also gs://: a merged checkpoint "
                   "streams from the bucket, safetensors are copied to $QWEN_EDIT_JAX_CACHE first)")
    p.add_argument("--transformer", help="with a repo --model: another transformer checkpoint (e.g. merged, from "
                   "convert/; gs:// as for --model)")
    p.add_argument("--config", help="config.json for a single-file --model")
    p.add_argument("--prompt", help="edit instruction (image mode)")
    p.add_argument("--negative-prompt", default=" ", help="negative prompt for true CFG (image mode; default ' ', as "
                   "the Qwen model cards)")
    p.add_argument("--height", type=int, help="output height in pixels (image mode; default ≈ 1 Mpx at the "
                   "(last) image's aspect ratio; floored to a multiple of 16)")
    p.add_argument("--width", type=int, help="output width in pixels (image mode)")
    p.add_argument("--resolution", type=int,
                   help="image mode: the images go to the VAE at an area of N² (and the default output size); "
                        "default: the pipelines' 1024. Use the resolution the LoRA's cache was made at")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (image mode; different noise)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA file to merge (any supported key style); repeat for several")
    p.add_argument("--out", required=True, help="output folder (<sample id>.safetensors [+ .png], or edited PNGs)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (diffusers default 50)")
    p.add_argument("--scheduler-config", metavar="JSON",
                   help="a FlowMatchEulerDiscreteScheduler config (e.g. Qwen-Image-Lightning's, with --steps 4 "
                        "--cfg 1) "
                        "instead of the repo's scheduler/scheduler_config.json (--cache without a repo: Qwen-Image's)")
    p.add_argument("--cfg", type=float, default=4.0, help="true CFG scale (1 = off); needs a negative prompt: "
                   "--negative-prompt, or the cache's negative prompts")
    p.add_argument("--seed", type=int, default=0, help="noise seed (JAX noise, not torch's; with --cache it also "
                   "depends on the sample id)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward (grouped by image layout)")
    cfg_mode = p.add_mutually_exclusive_group()
    cfg_mode.add_argument("--separate-cfg", dest="batch_cfg", action="store_const", const=False,
                          help="run cond/uncond one after the other (less memory); default: per platform, "
                          "separate on CPU (measured faster there), batched on GPU/TPU")
    cfg_mode.add_argument("--batched-cfg", dest="batch_cfg", action="store_const", const=True,
                          help="run cond/uncond as one 2B batch")
    p.add_argument("--dtype", default="bf16", help="weights and activations: bf16 or float32")
    p.add_argument("--quantize", choices=["int8", "fp8", "int4"], default=None,
                   help="weight-only quantized DiT base (docs/quantization.md); not combinable with --lora")
    p.add_argument("--offload", choices=["none", "base"], default="none",
                   help="base: keep the DiT blocks' weights in host memory, streamed one layer at a time; "
                        "not combinable with --lora")
    p.add_argument("--attention", default="xla", help="attention kernel: xla, chunked, cudnn, splash")
    p.add_argument("--ids", nargs="+", help="only these sample ids")
    p.add_argument("--limit", type=int, help="only the first N selected samples")
    p.add_argument("--mesh", help="DATA,FSDP,TENSOR device mesh (-1 = the remaining devices)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--skip-existing", action="store_true", help="keep existing output files, sample the rest")
    args = p.parse_args(argv)

    from qwen_edit_jax.utils.accelerators import cpu_unless_accelerator

    cpu_unless_accelerator()  # before JAX picks a platform: no libtpu probe noise on CPU-only machines

    from qwen_edit_jax.errors import CheckpointError
    from qwen_edit_jax.cache_format import DataError

    try:
        if bool(args.cache) == bool(args.image):
            raise ValueError("give either --cache CACHE (sample a training cache) or --image IMAGE --prompt TEXT "
                             "(edit images)")
        message = edit_images(args) if args.image else sample_cache(args)
    except (DataError, CheckpointError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(message)
    return 0


def parse_loras(specs: list[str]) -> list[tuple[str, float]]:
    """--lora values → (path, scale) pairs; a missing file is an error (before any weight is loaded)."""
    loras = [parse_lora(s) for s in specs]
    for path, _ in loras:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--lora {path}: LoRA file not found")
    return loras


def is_repo(path: str) -> bool:
    """A diffusers repo folder (transformer/ and vae/), as opposed to a bare transformer checkpoint."""
    return all(os.path.isdir(os.path.join(path, sub)) for sub in ("transformer", "vae"))


def make_mesh(args):
    from qwen_edit_jax import parallel

    return parallel.make_mesh(*parse_mesh(args.mesh)) if args.mesh else None


def png_path(latents_path: str) -> str:
    """The PNG written next to a sampled latents file."""
    return os.path.splitext(latents_path)[0] + ".png"


def scheduler_for(args, repo: bool):
    """The sampling schedule: --scheduler-config, else a repo --model's scheduler/scheduler_config.json, else
    Qwen-Image's (read and checked before any weight is loaded)."""
    from qwen_edit_jax import sampling

    if args.scheduler_config:
        return sampling.read_scheduler_config(args.scheduler_config)
    path = os.path.join(args.model, "scheduler", "scheduler_config.json")
    return sampling.read_scheduler_config(path) if repo and os.path.exists(path) else sampling.QWEN_IMAGE_SCHEDULER


def sample_cache(args) -> str:
    """--cache mode: sampled latents per example, plus PNGs when --model is a repo folder."""
    from qwen_edit_jax import loading, sampling
    from qwen_edit_jax.config import DiTConfig, ModelOptions, as_dtype
    from qwen_edit_jax.pipeline import latents_to_images, save_png, transformer_config_source
    from qwen_edit_jax.cache_format import CachedDataset, DataError
    from qwen_edit_jax.utils import storage
    from qwen_edit_jax.utils.files import check_output_dir
    from qwen_edit_jax.weights.safetensors_io import load_tensors

    check_output_dir(args.out, "--out")
    loras = parse_loras(args.lora)
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
    paths, _ = sampling.plan_outputs(dataset, indices, args.out, overwrite=args.overwrite,
                                     skip_existing=args.skip_existing)  # fail fast, before loading weights
    repo = is_repo(args.model)
    scheduler = scheduler_for(args, repo)
    if repo and not (args.overwrite or args.skip_existing):
        for path in paths.values():
            if os.path.lexists(png_path(path)):
                raise FileExistsError(f"{png_path(path)} already exists; pass --overwrite or --skip-existing")
    if args.transformer and not repo:
        raise ValueError(f"--transformer needs --model to be a repo folder (with transformer/ and vae/); "
                         f"{args.model} is not")
    settings = sampling.SampleSettings(num_inference_steps=args.steps, true_cfg_scale=args.cfg, seed=args.seed,
                                       batch_size=args.batch_size, batch_cfg=args.batch_cfg, scheduler=scheduler)
    dtype = as_dtype(args.dtype)
    options = ModelOptions(param_dtype=dtype, dtype=dtype, attention=args.attention, quantize=args.quantize,
                           offload=args.offload)
    source = args.model
    config = DiTConfig.from_json(args.config) if args.config else None
    if repo:
        source = args.transformer or os.path.join(args.model, "transformer")
        if config is None:
            config = transformer_config_source(source, args.model)
    mesh = make_mesh(args)
    model = loading.load_transformer(source, options=options, config=config, lora=loras or None, mesh=mesh)
    written = sampling.sample_dataset(
        model, dataset, args.out, settings=settings, indices=indices, overwrite=args.overwrite,
        skip_existing=args.skip_existing, mesh=mesh, warn=lambda m: print(f"warning: {m}", file=sys.stderr),
        metadata={"model": storage.normalize(args.model), "cache": os.path.abspath(args.cache),
                  "loras": ";".join(f"{os.path.abspath(p)}:{s}" for p, s in loras), "dtype": str(dtype)})
    if not repo:
        return f"done: {len(written)} samples in {os.path.abspath(args.out)}"
    del model  # the transformer is done; decode with the repo's VAE
    todo = {sid: path for sid, path in written.items()
            if not (args.skip_existing and os.path.exists(png_path(path)))}
    vae = loading.load_vae(os.path.join(args.model, "vae"), dtype=dtype, mesh=mesh) if todo else None
    for sample_id, path in todo.items():
        image, = latents_to_images(vae, load_tensors(path)["latents"][None])
        save_png(png_path(path), image, {"sample_id": sample_id, "latents": os.path.basename(path),
                                         "model": os.path.abspath(args.model), "seed": args.seed,
                                         "num_inference_steps": args.steps}, overwrite=args.overwrite)
    return f"done: {len(written)} samples (latents + PNG) in {os.path.abspath(args.out)}"


def open_image(path: str):
    """An --image file as an RGB PIL image; a missing or unreadable file is a one-line error."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path}: file not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"--image {path}: cannot read the image ({e})") from None


def edit_images(args) -> str:
    """--image mode: encode the prompts (text encoder + VAE), release the text encoder, load the
    transformer, sample, decode, write PNGs."""
    from qwen_edit_jax.config import ModelOptions, as_dtype
    from qwen_edit_jax.imaging import output_dims, plan_sizes
    from qwen_edit_jax.pipeline import QwenImageEditPipeline, images_per_prompt, pipeline_variant, save_png
    from qwen_edit_jax.utils.files import check_output_dir

    if not args.prompt:
        raise ValueError("--image needs --prompt TEXT (the edit instruction)")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    out = check_output_dir(args.out, "--out")
    loras = parse_loras(args.lora)
    images = [open_image(path) for path in args.image]
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such folder (image mode needs a diffusers "
                                f"Qwen-Image-Edit repo folder)")
    variant = pipeline_variant(args.model)
    scheduler = scheduler_for(args, True)
    images_per_prompt(images, variant, 1)  # the original Edit takes one image: say so before loading anything
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 16:
            raise ValueError(f"{name} {value}: the output must be at least 16 pixels (a multiple of 16)")
    if args.resolution is not None and args.resolution < 16:
        raise ValueError(f"--resolution {args.resolution}: must be at least 16 pixels")
    area = QwenImageEditPipeline.vae_image_area if args.resolution is None else args.resolution * args.resolution
    output_dims(args.height, args.width, plan_sizes(images, variant, vae_area=area).output, 16)
    stem = os.path.splitext(os.path.basename(args.image[0]))[0] or "edit"
    names = [f"{stem}-{args.seed}.png"] if args.num_images == 1 else [
        f"{stem}-{args.seed}-{k}.png" for k in range(args.num_images)]
    targets = [os.path.join(out, n) for n in names]
    if args.skip_existing and all(os.path.exists(t) for t in targets):
        return f"done: all {len(targets)} images already in {out}"
    if not args.overwrite:
        for t in targets:
            if os.path.lexists(t):
                raise FileExistsError(f"{t} already exists; pass --overwrite (or --skip-existing)")
    dtype = as_dtype(args.dtype)
    mesh = make_mesh(args)
    pipe = QwenImageEditPipeline.from_pretrained(args.model, dtype=dtype, mesh=mesh, variant=variant,
                                                 components=("text_encoder", "vae"), scheduler_config=scheduler)
    pipe.vae_image_area = area
    cfg = args.cfg > 1
    embeds, mask = pipe.encode_prompt(args.prompt, images)
    neg, neg_mask = pipe.encode_prompt(args.negative_prompt, images) if cfg else (None, None)
    pipe.text_encoder = None  # freed before the transformer loads: the two are never in memory together
    gc.collect()
    options = ModelOptions(param_dtype=dtype, dtype=dtype, attention=args.attention, quantize=args.quantize,
                           offload=args.offload)
    pipe.transformer = QwenImageEditPipeline.from_pretrained(
        args.model, mesh=mesh, transformer=args.transformer, lora=loras or None, options=options, variant=variant,
        components=("transformer",)).transformer
    result = pipe(image=images, prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                  negative_prompt_embeds_mask=neg_mask, true_cfg_scale=args.cfg, height=args.height,
                  width=args.width, num_inference_steps=args.steps, num_images_per_prompt=args.num_images,
                  seed=args.seed, batch_cfg=args.batch_cfg)
    meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt if cfg else "",
            "true_cfg_scale": args.cfg if cfg else 1.0, "seed": args.seed, "num_inference_steps": args.steps,
            "images": ";".join(os.path.abspath(p) for p in args.image), "model": os.path.abspath(args.model),
            "transformer": os.path.abspath(args.transformer) if args.transformer else "",
            "loras": ";".join(f"{os.path.abspath(p)}:{s}" for p, s in loras), "dtype": str(dtype),
            "vae_image_area": area, "scheduler_config": os.path.abspath(args.scheduler_config) if args.scheduler_config
            else "",
            "software": "qwen-edit-jax sample/sample.py"}
    for k, (target, image) in enumerate(zip(targets, result.images)):
        save_png(target, image, {**meta, "index": k}, overwrite=args.overwrite)
    return f"done: {len(targets)} images in {out}"


if __name__ == "__main__":
    sys.exit(main())
