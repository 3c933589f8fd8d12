#!/usr/bin/env python
"""Bake one or more LoRAs into a Qwen-Image(-Edit) base model, streamed layer by layer.

    python convert/merge_lora.py --base REPO_OR_TRANSFORMER --lora FILE[:STRENGTH] [--lora FILE2[:STRENGTH] ...]
        --output OUT [--format diffusers|comfyui|merged] [--quantize int8|fp8|int4] [--dtype bf16|fp32|fp16]
        [--config config.json|PRESET] [--overwrite] [--max-shard-size 5GB] [--no-progress]

--base: a diffusers repo folder (model_index.json + transformer/) or a transformer checkpoint in any layout
the converter reads. LoRAs in any key style, applied in the order given (STRENGTH default 1). --format
diffusers (default): a repo base gives a whole repo with only transformer/ replaced (other components
hard-linked), loadable with from_pretrained(OUT) in diffusers and here; a transformer base gives a
transformer folder. comfyui: one safetensors file; merged: a merged Orbax checkpoint (--quantize needs it).
The output appears only when complete; an existing OUT only with --overwrite. Errors: one line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--base", required=True, help="diffusers repo folder or transformer checkpoint")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="LoRA file (any key style) and its strength; repeat for several, merged in order")
    p.add_argument("--output", required=True, help="output folder (diffusers, merged) or .safetensors file (comfyui)")
    p.add_argument("--format", choices=["diffusers", "comfyui", "merged"], default="diffusers",
                   help="output layout (default diffusers)")
    p.add_argument("--quantize", choices=["int8", "fp8", "int4"],
                   help="with --format merged: a weight-only quantized merged checkpoint (docs/quantization.md)")
    p.add_argument("--dtype", help="output dtype (bf16, fp32, fp16); default: the base's")
    p.add_argument("--config", help="config.json or preset name, for a base without a config.json beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new one is complete)")
    p.add_argument("--max-shard-size", default="5GB", help="shard size of a diffusers folder (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # merging never needs an accelerator
    from qwen_edit_jax.convert import merge_loras
    from qwen_edit_jax.errors import CheckpointError, LoraError
    from qwen_edit_jax.lora.merge import parse_lora_spec

    try:
        loras = [parse_lora_spec(spec) for spec in args.lora]
        res = merge_loras(args.base, loras, args.output, format=args.format, config=args.config, dtype=args.dtype,
                          quantize=args.quantize, overwrite=args.overwrite, progress=not args.no_progress,
                          max_shard_size=args.max_shard_size, log=lambda s: print(s, flush=True))
    except (CheckpointError, LoraError, ValueError, FileExistsError, FileNotFoundError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written at the output", file=sys.stderr)
        return 130
    print(f"wrote {res.written}: {res.output} ({res.nbytes / 1e6:.1f} MB, {res.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
