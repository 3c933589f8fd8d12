"""The one closeness metric of the test suite, and the assertion that uses it.

`rel_err(ours, ref)` = max |ours − ref| / max |ref|: the largest error relative to the reference's scale
(not element by element, so a reference value near zero does not blow it up; not a norm ratio, so one bad
element among many is not averaged away). A reference that is all zeros makes it the absolute max error.
`mask` keeps the valid positions only (e.g. the real tokens of a padded batch).

`rms_err(ours, ref)` = RMS(ours − ref) / RMS(ref) (= ‖ours − ref‖ / ‖ref‖): the second metric, only for
errors that are noise by design — bf16 rounding (test_vae compares ours with diffusers' own bf16 error) and
weight quantization (test_quantization, test_text_encoder_quant) — where the max over thousands of rounding
errors is too noisy a number to compare or to bound.

`assert_close` (≤ tol) and `assert_differs` (> a floor: a guard that a setting really changes the output) take
arrays; `assert_err` takes an error already measured (e.g. by a subprocess worker with `rel_err`).

Tolerances: each assertion states its tolerance next to the error measured when it was set, about 10× above
it (rounded up to one significant figure), e.g.

    assert_close(ours, ref, 2e-5, "dit forward")  # measured 1.7e-6

Set COMPARE_LOG=/some/file to append every measured error (test, what, error, tolerance) to that file: how
the measured values in the comments were taken, and how to retake them after a change.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def rel_err(ours: Any, ref: Any, mask: Any = None) -> float:
    """max |ours − ref| / max |ref| (over `mask`'s true positions where given), in float64."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert a.shape == b.shape, f"shapes differ: ours {a.shape}, reference {b.shape}"
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        a, b = a[keep], b[keep]
    scale = np.max(np.abs(b)) if b.size else 0.0
    err = np.max(np.abs(a - b)) if a.size else 0.0
    return float(err / scale) if scale > 0 else float(err)


def rms_err(ours: Any, ref: Any) -> float:
    """RMS(ours − ref) / RMS(ref), in float64."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert a.shape == b.shape, f"shapes differ: ours {a.shape}, reference {b.shape}"
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def _log(what: str, err: float, tol: float) -> None:
    path = os.environ.get("COMPARE_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" (")[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{what}\t{err:.3g}\t{tol:.3g}\n")


def assert_err(err: float, tol: float, what: str) -> float:
    """Assert an error measured elsewhere (e.g. by `rel_err` in a subprocess) is ≤ tol; returns it."""
    _log(what, err, tol)
    assert err <= tol, f"{what}: relative error {err:.3g} > tolerance {tol:.3g}"
    return err


def assert_close(ours: Any, ref: Any, tol: float, what: str, mask: Any = None) -> float:
    """Assert rel_err(ours, ref, mask) ≤ tol; the failure names `what`, the error and the tolerance. Returns the
    error."""
    return assert_err(rel_err(ours, ref, mask), tol, what)


def assert_differs(ours: Any, other: Any, min_err: float, what: str, mask: Any = None) -> float:
    """Assert rel_err(ours, other, mask) > min_err: a guard that a setting really changes the output (the
    opposite of assert_close). Returns the error."""
    err = rel_err(ours, other, mask)
    _log(what, err, min_err)
    assert err > min_err, f"{what}: relative difference {err:.3g} ≤ {min_err:.3g}, expected a real difference"
    return err
