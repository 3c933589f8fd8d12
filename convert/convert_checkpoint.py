#!/usr/bin/env python
"""Convert Qwen-Image(-Edit) transformer checkpoints and LoRAs between the standard PyTorch layout
(diffusers / DiffSynth / ComfyUI, separate q/k/v) and this project's merged-QKV Flax layout.

    python convert/convert_checkpoint.py --input IN --output OUT --direction to_merged|to_standard
        [--config config.json|PRESET] [--format diffusers|comfyui|kohya|diffsynth|lightx2v] [--dtype bf16|fp32|fp16]
        [--overwrite] [--max-shard-size 5GB] [--no-progress]

IN may be a base model (diffusers folder, index, single file, ComfyUI prefixes, original merged-QKV
PyTorch layout, or a merged checkpoint) or a LoRA file in any key style, recognised by its content (the
file name and extension do not matter); what was detected is printed. --format is the output's key
style: base to_standard diffusers (default) / diffsynth / comfyui; LoRA to_standard any (default
diffusers); LoRA to_merged any (default: the input's); base to_merged has none (refused).
Errors are reported in one paragraph (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="base model (folder / index / .safetensors / merged) or LoRA file")
    p.add_argument("--output", required=True, help="output folder (base model) or .safetensors file (LoRA, comfyui)")
    p.add_argument("--direction", required=True, choices=["to_merged", "to_standard"])
    p.add_argument("--config", help="config.json or preset name, for inputs without a config.json beside them "
                                    "(zero_cond_t / Edit-2511 is not visible in the weights)")
    p.add_argument("--format", choices=["diffusers", "comfyui", "kohya", "diffsynth", "lightx2v"],
                   help="key style of the output: base to_standard diffusers (default) / diffsynth folder or comfyui "
                        "file; LoRAs any style (default: diffusers for to_standard, the input's for to_merged)")
    p.add_argument("--dtype", help="cast every tensor (bf16, fp32, fp16); default: keep each tensor's dtype")
    p.add_argument("--quantize", choices=["int8", "fp8", "int4"],
                   help="base to_merged only: write a quantized merged checkpoint (block kernels 8-bit + per-channel "
                        "scales, about half the bytes, or int4 + per-group scales, about a quarter); load it with "
                        "quantize= set to the same mode")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new one is complete)")
    p.add_argument("--max-shard-size", default="5GB", help="shard size of a diffusers folder (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion never needs an accelerator
    from qwen_edit_jax.convert import convert
    from qwen_edit_jax.errors import CheckpointError

    try:
        res = convert(args.input, args.output, args.direction, config=args.config, format=args.format,
                      dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
                      max_shard_size=args.max_shard_size, log=lambda s: print(s, flush=True),
                      quantize=args.quantize)
    except (CheckpointError, ValueError, FileExistsError, FileNotFoundError, OSError) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written at the output", file=sys.stderr)
        return 130
    mb = res.nbytes / 1e6
    print(f"wrote {res.written}: {res.output} ({res.tensors} tensors, {mb:.1f} MB, {res.seconds:.1f} s, "
          f"{mb / max(res.seconds, 1e-9):.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
