"""Timing helpers shared by the benchmarks.

On a shared machine other processes steal CPU time and inflate timings several-fold. Each timed
iteration therefore records how much CPU the rest of the machine used meanwhile (from
/proc/stat, minus this process); iterations where others took a noticeable share are not "clean".
Medians are reported over clean iterations when there are enough, else over all (and flagged).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

REFERENCE_EXTRA = "pip install -e '.[test]'"

# PyTorch's OpenMP worker threads spin for a while after each parallel region. With both sides in one
# process, interleaved step by step, that spinning took CPU from the JAX step that followed (2.64 vs 2.35 s
# per LoRA step at 2,176 tokens; PyTorch's own step 1.92 vs 1.99 s, within noise). Idle workers therefore
# sleep (set before torch is imported; an explicit OMP_WAIT_POLICY wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def reference_missing(*modules: str) -> list[str]:
    """Which of the PyTorch reference's packages (torch, diffusers, peft) are not installed; the main
    install has none of them (they come with the test extra). Prints what the benchmark does instead."""
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if missing:
        print(f"note: {', '.join(missing)} not installed: the PyTorch/diffusers comparison needs the test extra "
              f"({REFERENCE_EXTRA}); timing the JAX side only", file=sys.stderr, flush=True)
    return missing

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals) - idle) / _TICK


def time_fn(fn: Callable[[], Any], *, iters: int = 10, warmup: int = 2, foreign_share: float = 0.05,
            min_clean: int = 3) -> dict[str, Any]:
    """Median wall time of `fn()` (which must block until its result is ready).

    An iteration is clean when other processes used at most `foreign_share` of the machine's CPU
    capacity during it (plus one clock tick of slack for /proc/stat's 10 ms resolution).
    """
    ncpu = os.cpu_count() or 1
    for _ in range(warmup):
        fn()
    walls, clean = [], []
    for _ in range(iters):
        b0, p0, t0 = _busy_s(), time.process_time(), time.perf_counter()
        fn()
        t1, p1, b1 = time.perf_counter(), time.process_time(), _busy_s()
        walls.append(t1 - t0)
        if b0 is not None and b1 is not None and (b1 - b0) - (p1 - p0) <= 1.0 / _TICK + foreign_share * ncpu * (t1 - t0):
            clean.append(t1 - t0)
    use_clean = len(clean) >= min_clean
    return {
        "median_s": statistics.median(clean if use_clean else walls),
        "clean": use_clean,
        "n": len(clean) if use_clean else len(walls),
        "all_median_s": statistics.median(walls),
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def emit_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True))
