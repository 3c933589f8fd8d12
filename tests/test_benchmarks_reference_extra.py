"""The documented benchmarks on an install without the test extra (no torch / diffusers / peft):
they say which extra the comparison needs and time the JAX side alone, instead of `No module named 'torch'`."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.background import Job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run a benchmark as `python benchmarks/X.py …` would, with torch, diffusers and peft made unimportable.
WITHOUT_TORCH = """
import runpy, sys
for m in ("torch", "diffusers", "peft"):
    sys.modules[m] = None  # `import m` now raises ImportError, as on the main install
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


JOBS = {script: Job(f"benchmarks/{script} without torch",
                    [sys.executable, "-c", WITHOUT_TORCH, os.path.join("benchmarks", script), *args, "--json"],
                    cwd=ROOT, timeout=600)
        for script, args in [("train_step.py", ["--preset", "tiny", "--lora-rank", "4", "--iters", "1", "--warmup", "0"]),
                             ("sample.py", ["--preset", "tiny", "--steps", "1", "--iters", "1"])]}


@pytest.mark.slow
@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.background(j)) for s, j in JOBS.items()])
def test_benchmark_without_the_test_extra(script):
    r = JOBS[script].result()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "No module named" not in r.stderr
    assert "needs the test extra (pip install -e '.[test]'); timing the JAX side only" in r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    impls = [row["impl"] for row in result["results"]]
    assert impls and all(i.startswith("jax") for i in impls), impls
