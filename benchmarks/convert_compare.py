#!/usr/bin/env python
"""Converter speed of several source trees side by side: rounds interleaved on one synthetic input.

For A/B comparisons on a shared or noisy machine (e.g. a change against its parent commit, or a
tree with an I/O technique switched off): each tree is a checkout of this repository (a git
worktree or a `git archive` copy); its own `convert/convert_checkpoint.py` runs with its own package
first on `PYTHONPATH`; rounds go tree 1, 2, …, n, then n, …, 1, and so on, so load changes and
what one run leaves in the page cache hit every tree alike. Each direction's input is dropped from the page cache first, as in `convert_throughput.py`
(whose synthetic input and page-cache protocol this reuses). One JSON line per tree and round,
then a summary: conversion MB/s (median, min–max) per tree and direction (JSON last line).

    python benchmarks/convert_compare.py --rounds 5 --layers 3 old=/tmp/parent new=.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.convert_throughput import drop_from_page_cache, make_checkpoint  # noqa: E402


def run_cli(tree: str, args: list[str], nbytes: int) -> dict:
    """One conversion with `tree`'s CLI under /usr/bin/time -v: wall s, conversion s, MB/s, peak RSS."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=tree)
    cmd = ["/usr/bin/time", "-v", sys.executable, os.path.join(tree, "convert", "convert_checkpoint.py"), *args,
           "--no-progress", "--overwrite"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr[-3000:]}")
    convert_s = float(re.search(r", ([0-9.]+) s, [0-9]+ MB/s\)", r.stdout).group(1))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall_s": wall, "mb_s": nbytes / 1e6 / wall, "convert_s": convert_s,
            "convert_mb_s": nbytes / 1e6 / convert_s, "peak_rss_mb": rss_kb / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="+", metavar="LABEL=PATH", help="source trees to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=3, help="full-width blocks (680 MB each in bf16)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    trees = [(label, os.path.abspath(path)) for label, _, path in (t.partition("=") for t in args.trees)]
    work = args.workdir or tempfile.mkdtemp(prefix="convcompare-")
    src = os.path.join(work, "diffusers")
    _, nbytes = make_checkpoint(src, args.layers, "1GB")
    runs: dict[tuple[str, str], list[float]] = {}
    try:
        for rnd in range(args.rounds):
            for label, tree in (trees if rnd % 2 == 0 else trees[::-1]):
                merged, std = os.path.join(work, "merged"), os.path.join(work, "standard")
                row = {"tree": label, "round": rnd, "loadavg_1min": os.getloadavg()[0]}
                drop_from_page_cache(src)
                row["to_merged"] = run_cli(tree, ["--input", src, "--output", merged, "--direction", "to_merged"],
                                           nbytes)
                drop_from_page_cache(merged)
                row["to_standard"] = run_cli(tree, ["--input", merged, "--output", std, "--direction",
                                                    "to_standard"], nbytes)
                shutil.rmtree(merged)
                shutil.rmtree(std)
                print(json.dumps(row), flush=True)
                for d in ("to_merged", "to_standard"):
                    runs.setdefault((d, label), []).append(row[d]["convert_mb_s"])
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{args.layers} blocks, {nbytes / 1e6:.0f} MB, {args.rounds} rounds; conversion MB/s")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for d, (label, _) in ((d, t) for d in ("to_merged", "to_standard") for t in trees):
        v = runs[(d, label)]
        summary.setdefault(d, {})[label] = {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
        print(f"{d:<12} {label:<12} median {statistics.median(v):5.0f}  min {min(v):5.0f}  max {max(v):5.0f}  "
              f"runs {' '.join(f'{x:.0f}' for x in v)}")
    print(json.dumps({"layers": args.layers, "checkpoint_mb": nbytes / 1e6, "rounds": args.rounds,
                      "cpus": os.cpu_count(), "convert_mb_s": summary}))


if __name__ == "__main__":
    main()
