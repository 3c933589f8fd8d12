#!/usr/bin/env python
r"""Encode a folder of edit pairs (or a metadata file) into the training cache that train_lora.py reads.

    python train/cache_dataset.py --dataset my_pairs/ --model Qwen-Image-Edit-2509 --output cache/ \
        [--resolution 1024] [--batch-size 4] [--mesh 1,-1,1] [--skip-bad] [--negative-prompt " "] [--quantize int8]

Layouts: a folder of target images with .txt captions and control/ (or control_0/, control_1/, …) holding
the reference images by file stem (musubi-tuner, ai-toolkit); or metadata.jsonl / .csv / .json with
image, edit_image (one path or a list), prompt (DiffSynth) or image_path, control_path[_N], caption
(musubi); optional loss masks in mask/ by stem or a `mask` field. Every file is checked before the
encoders load; bad inputs are listed with their reasons and nothing is written unless --skip-bad. A killed run
resumes when the same command is run again (OUTPUT.partial/ holds the finished shards; for a gs://bucket/prefix
OUTPUT, the shards are uploaded to it as they fill, OUTPUT.partial/ holds the records, and manifest.json is written
last). docs/training.md, "Making a cache from your images".
Exit codes: 0 done (or already complete), 2 bad input or options (nothing written), 1 failed while
encoding (finished shards kept for resuming), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_mesh(spec: str) -> tuple[int, int, int]:
    try:
        data, fsdp, tensor = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--mesh must be DATA,FSDP,TENSOR (e.g. 1,-1,1), got {spec!r}") from None
    return data, fsdp, tensor


def parse_resolutions(text: str) -> int | tuple[int, ...]:
    """`1024` → 1024; `512,768,1024` → (512, 768, 1024)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma-separated list (512,768,1024), "
                                         f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    description, epilog = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset folder, or a metadata .jsonl / .csv / .json file")
    p.add_argument("--model", required=True, help="diffusers Qwen-Image-Edit(-2509/-2511) repo folder")
    p.add_argument("--output", required=True, help="cache folder to create (manifest.json + shards), or a gs:// "
                                                   "prefix (shards uploaded as they fill, manifest.json last)")
    p.add_argument("--resolution", type=parse_resolutions, default=1024,
                   help="target bucket area resolution² at the image's aspect ratio, sides multiples of 32; "
                        "several (512,768,1024): every sample cached at each, with ids <id>@<resolution>")
    p.add_argument("--upscale", action="store_true", help="enlarge images smaller than resolution² (default: never)")
    p.add_argument("--control-resolution", default="pipeline",
                   help="reference size for the VAE: 'pipeline' (1024² area, as the pipelines encode them), "
                        "'target' (the target's bucket), or N (area N²)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per encoder call (split over the devices)")
    p.add_argument("--mesh", help="DATA,FSDP,TENSOR device mesh (default with several devices: 1,-1,1; "
                                  "-1,1,1 is faster when both encoders fit on one device)")
    p.add_argument("--skip-bad", action="store_true", help="cache the good samples and report the bad ones")
    p.add_argument("--report", help="also write the validation report (bad and converted files) to this JSON file")
    neg = p.add_mutually_exclusive_group()
    neg.add_argument("--negative-prompt", default=" ",
                     help="negative prompt cached per sample with its images, for true CFG (default ' ')")
    neg.add_argument("--no-negative-prompt", action="store_true", help="cache no negative prompt")
    p.add_argument("--dtype", default="bf16", help="encoders' weights and activations: bf16 or float32")
    p.add_argument("--quantize", metavar="MODE",
                   help="int8 (or fp8): load the text encoder's large linear kernels as 8-bit values with per-channel "
                        "scales, quantized on load (Qwen2.5-VL-7B weights 8.3 GB instead of 15.5: fits a 16 GB "
                        "chip with room for the batch; the cached prompt embeddings differ slightly, see "
                        "docs/text_encoder.md); the VAE stays in --dtype. Default: none (float weights)")
    p.add_argument("--alpha-background", metavar="COLOR",
                   help="composite transparent images over COLOR (white, black, #rrggbb); default: reject them")
    p.add_argument("--allow-empty-prompt", action="store_true", help="accept empty captions / prompts")
    p.add_argument("--allow-no-reference", action="store_true",
                   help="cache samples without a reference image (a metadata row without one, or a target with "
                        "none in any control folder) as text-to-image pairs: Qwen-Image's text-to-image prompt "
                        "template, no reference latents (default: such samples are bad input)")
    p.add_argument("--caption-ext", default=".txt", help="caption file extension in the folder layout")
    p.add_argument("--layout", default="auto", choices=("auto", "folder", "metadata"),
                   help="force a layout (auto: a metadata file if the folder has one, else the folder layout)")
    p.add_argument("--control-dir", action="append", default=[], metavar="DIR",
                   help="reference folder(s) in order, instead of DATASET/control*/ (repeat for several)")
    p.add_argument("--variant", choices=("edit", "edit_plus"),
                   help="pipeline to encode for (default: from the repo's model_index.json)")
    p.add_argument("--shard-mb", type=float, default=512, help="shard size in MB (also the resume granularity)")
    p.add_argument("--attention", help="vision-tower attention kernel (xla, chunked, cudnn, splash)")
    p.add_argument("--workers", type=int, help="image decoding threads")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing cache at --output and discard an interrupted run's progress")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from qwen_edit_jax.utils.accelerators import cpu_unless_accelerator

    cpu_unless_accelerator()  # before JAX picks a platform: no libtpu probe noise on CPU-only machines

    import jax

    from qwen_edit_jax.cache_format import DataError
    from qwen_edit_jax.caching import BadInput, CacheOptions, LayoutError, cache_dataset, format_report
    from qwen_edit_jax.caching.buckets import parse_control_resolution
    from qwen_edit_jax.caching.writer import partial_path
    from qwen_edit_jax.errors import CheckpointError
    from qwen_edit_jax.parallel import batch_axes_for, distributed, make_mesh
    from qwen_edit_jax.utils import storage

    def err(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr, flush=True)

    started = False

    def progress(done: int) -> None:
        nonlocal started
        started = True

    try:
        distributed.initialize()
        storage.check_output(args.output, "--output")
        if args.shard_mb <= 0:
            raise ValueError(f"--shard-mb {args.shard_mb}: must be positive")
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers {args.workers}: must be >= 1")
        options = CacheOptions(
            resolution=args.resolution, upscale=args.upscale,
            control_resolution=parse_control_resolution(args.control_resolution), batch_size=args.batch_size,
            negative_prompt=None if args.no_negative_prompt else args.negative_prompt, dtype=args.dtype,
            alpha_background=args.alpha_background, allow_empty_prompt=args.allow_empty_prompt,
            allow_no_reference=args.allow_no_reference,
            skip_bad=args.skip_bad, caption_ext=args.caption_ext, layout=args.layout,
            control_dirs=tuple(args.control_dir), variant=args.variant, shard_bytes=int(args.shard_mb * 1024**2),
            attention=args.attention, overwrite=args.overwrite, progress=not args.no_progress, workers=args.workers,
            quantize=args.quantize)
        mesh = None
        if args.mesh or jax.device_count() > 1:
            mesh = make_mesh(*parse_mesh(args.mesh or "1,-1,1"))
            n = 1
            for a in batch_axes_for(mesh):
                n *= mesh.shape[a]
            if args.batch_size % n and jax.process_index() == 0:
                print(f"note: --batch-size {args.batch_size} does not split evenly over the mesh's {n} batch "
                      f"devices; a multiple of {n} keeps them all busy", file=sys.stderr)
        result = cache_dataset(args.dataset, args.output, args.model, options, mesh=mesh, on_batch=progress)
    except BadInput as e:
        if jax.process_index() == 0:
            if args.report and e.report is not None:
                _write_report(args.report, e.report.to_json())
            err(f"{e}:")
            for line in format_report(e.report) if e.report is not None else []:
                print(line, file=sys.stderr)
            good = len(e.report.good) if e.report is not None else 0
            hint = (f"fix these files, or pass --skip-bad to cache the {good} good samples" if good and not
                    args.skip_bad else "fix these files")
            print(f"nothing was written; {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        err(f"interrupted; {_resume_hint(args.output, partial_path)}")
        return 130
    except (LayoutError, CheckpointError, DataError, distributed.DistributedError, OSError, ValueError) as e:
        err(_one_line(e) if not started else f"{_one_line(e)}; {_resume_hint(args.output, partial_path)}")
        return 1 if started else 2
    except Exception as e:  # a failure while encoding (device, compiler, out of memory, a bug)
        traceback.print_exc()
        err(f"{type(e).__name__}: {_one_line(e)[:500]}; {_resume_hint(args.output, partial_path)}")
        return 1
    if jax.process_index() != 0:
        return 0
    if args.report:
        _write_report(args.report, result.report.to_json())
    lo, hi = result.prompt_lengths
    if result.already_complete:
        print(f"done: {result.output} is already complete ({result.samples} samples)")
    else:
        resumed = f", {result.resumed_from} resumed" if result.resumed_from else ""
        rate = result.encoded / max(result.seconds, 1e-9)
        print(f"done: {result.samples} samples in {result.output} ({result.encoded} encoded{resumed}, {rate:.2f} "
              f"samples/s overall, {result.report.bad_samples} skipped)")
    print(f"prompts: {lo}-{hi} tokens; training needs data.text_buckets reaching {hi} (the default tops out at "
          f"1024)" if hi > 1024 else f"prompts: {lo}-{hi} tokens")
    return 0


def _resume_hint(output: str, partial_path) -> str:
    from qwen_edit_jax.utils import storage

    partial = partial_path(output)
    if storage.isdir(partial):
        return f"finished shards are kept in {partial}: run the same command again to resume"
    return "nothing was kept"


def _write_report(path: str, report: dict) -> None:
    """The --report file, written atomically (imported here: the package loads after the device setup)."""
    from qwen_edit_jax.utils.files import atomic_path

    with atomic_path(path, overwrite=True) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
