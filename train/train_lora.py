#!/usr/bin/env python
r"""Train a LoRA on the merged-QKV Qwen-Image-Edit DiT.

    python train/train_lora.py --config train/configs/demo.yaml --output-dir runs/demo \
        [--max-steps N] [--save-every N] [section.key=value ...]

`section.key=value` overrides may stand anywhere on the line, before or after the options.
Re-running the same command on the same output directory resumes from its newest complete
checkpoint; the learning-rate schedule keeps its length unless optim.schedule_steps says otherwise.
Writes DIR/run.json, DIR/metrics.jsonl, DIR/tensorboard/, DIR/validation/ (before/after grids of
validation.prompts), DIR/checkpoints/, DIR/lora_diffusers.safetensors; a run that
fails before its first checkpoint leaves no DIR behind (unless DIR existed before). DIR, data.path and
data.datasets[].path may be gs://bucket/prefix URLs (docs/training.md).

Exit codes: 0 done, 2 bad config/data/checkpoint/paths, 3 non-finite loss, 75 preempted (SIGTERM: the step
in progress was finished and checkpointed by every host, nothing exported; run the same command to resume).

Pre-flight: `--plan TOPOLOGY` (a TPU topology such as v5e:1x1 or v6e:2x4, compiled ahead of time through
libtpu on any machine; or `device`, the local GPU/TPU) builds this config's model abstractly (no weights),
AOT-compiles its exact training step and prints the peak memory per chip, whether it fits and the estimated
step time; when it does not fit, it compiles the cheapest changes until one fits and prints their
overrides. It trains nothing; `--json` adds the plan as one JSON line. Exit code 0 whether or not it fits.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    paragraphs = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description=paragraphs[0], epilog=next(t for t in paragraphs if t.startswith("Exit")),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML training config (e.g. train/configs/demo.yaml)")
    p.add_argument("--output-dir", help="run directory (created; resumed if it has checkpoints); required to train")
    p.add_argument("--plan", metavar="TOPOLOGY", help="pre-flight only: plan the step for a TPU topology "
                   "(v5e:1x1, v6e:2x4, …) or 'device' (the local accelerators) and suggest what fits")
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as one JSON line last")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--save-every", type=int, help="override train.save_every")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (YAML values)")
    args = p.parse_intermixed_args(argv)  # overrides before, between or after the options
    if args.plan is None and not args.output_dir:
        p.error("--output-dir is required (or --plan TOPOLOGY for a pre-flight plan)")
    if args.json and args.plan is None:
        p.error("--json goes with --plan")

    from qwen_edit_jax.utils.accelerators import cpu_unless_accelerator

    cpu_unless_accelerator()  # before JAX picks a platform: no libtpu probe noise on CPU-only machines

    from qwen_edit_jax.errors import CheckpointError
    from qwen_edit_jax.parallel.distributed import DistributedError, initialize
    from qwen_edit_jax.parallel.preemption import EXIT_PREEMPTED
    from qwen_edit_jax.training.config import ConfigError, load_config
    from qwen_edit_jax.cache_format import DataError
    from qwen_edit_jax.training.loop import NonFiniteLossError, TrainingPreempted, train
    from qwen_edit_jax.utils.storage import check_output

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    if args.plan is not None:
        return _plan(args.config, overrides, args.plan, args.json)
    try:
        check_output(args.output_dir, "--output-dir")
    except (OSError, ValueError) as e:  # a file in the way, or a URL scheme other than gs://
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        initialize()  # multi-host jobs (TPU pods, SLURM, JAX_* env): before anything touches devices
        cfg = load_config(args.config, overrides)
        result = train(cfg, args.output_dir)
    except (ConfigError, DataError, CheckpointError, DistributedError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except TrainingPreempted as e:  # every process: "preempted at step N; checkpoint saved; run the same command …"
        print(e, file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if result.first_loss is None:
        print(f"done: already at step {result.final_step}; LoRA: {', '.join(result.lora_files)}")
    elif result.final_step - (result.resumed_from or 0) == 1:
        print(f"done: step {result.final_step}, loss {result.first_loss:.4f} (one step), {result.seconds:.1f} s; "
              f"LoRA: {', '.join(result.lora_files)}")
    else:
        k = result.loss_steps
        what = "step" if k == 1 else f"{k} steps"
        print(f"done: step {result.final_step}, loss {result.first_loss:.4f} (first {what}) -> "
              f"{result.last_loss:.4f} (last {what}), {result.seconds:.1f} s; LoRA: {', '.join(result.lora_files)}")
    return 0


def _plan(config: str, overrides: list[str], where: str, as_json: bool) -> int:
    import json

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another local jax process may hold libtpu
    import jax

    from qwen_edit_jax.errors import CheckpointError
    from qwen_edit_jax.training.config import ConfigError, load_config
    from qwen_edit_jax.cache_format import DataError
    from qwen_edit_jax.training.plan import format_plan, format_suggestion, plan_training

    try:
        cfg = load_config(config, overrides)
        result = plan_training(cfg, where, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (ConfigError, DataError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:  # not an out-of-memory refusal (those are part of the plan)
        print(f"error: the compiler refused the step for {where}: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return 2
    print(format_plan(result))
    print(format_suggestion(result))
    if as_json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
