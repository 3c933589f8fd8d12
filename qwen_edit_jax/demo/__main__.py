"""`python -m qwen_edit_jax.demo [--out demo_data] [--num-pairs 64]`: write both demos' inputs once.

OUT/tiny-qwen-image-edit/ (the repo), OUT/pairs/ (the training pairs) and OUT/pairs_validation/
(held-out inputs, one per edit) for scripts/demo.sh and train/configs/demo.yaml; OUT/latent/tiny-dit/
and OUT/latent/cache/ (a random tiny DiT and a synthetic cache of latents) for
train/configs/latent_demo.yaml. Folders already there with the same settings are reused.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..testing.latent import LatentDemo, write_latent_demo
from ..testing.pairs import demo_validation_prompts, write_demo_pairs
from ..testing.repo import write_demo_repo
from ..utils.files import check_output_dir

REPO, PAIRS, VALIDATION, LATENT = "tiny-qwen-image-edit", "pairs", "pairs_validation", "latent"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qwen_edit_jax.demo", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_data", help="output folder (default: demo_data)")
    p.add_argument("--num-pairs", type=int, default=64, help="training pairs (default: 64)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels, a multiple of 32 (default: 128)")
    p.add_argument("--variant", choices=("edit", "edit_plus"), default="edit_plus",
                   help="pipeline class of the repo (default: edit_plus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the scenes and the latents (default: 0)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    latent = LatentDemo(model_seed=args.seed, data_seed=args.seed)
    try:
        out = check_output_dir(args.out, "--out")
        steps = (
            (REPO, "tiny Qwen-Image-Edit repo", lambda p: write_demo_repo(p, variant=args.variant, seed=args.seed)),
            (PAIRS, f"{args.num_pairs} edit pairs",
             lambda p: write_demo_pairs(p, num_pairs=args.num_pairs, size=args.size, seed=args.seed)),
            (VALIDATION, "held-out validation inputs",
             lambda p: demo_validation_prompts(p, size=args.size, seed=args.seed, num_pairs=args.num_pairs)),
            (LATENT, f"latent demo (random {latent.preset} DiT, {latent.num_samples} cached samples)",
             lambda p: write_latent_demo(p, latent)),
        )
        for name, what, write in steps:
            path = os.path.join(out, name)
            existed = os.path.lexists(path)
            write(path)
            print(f"{'reused' if existed else 'wrote'} {what}: {path}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
