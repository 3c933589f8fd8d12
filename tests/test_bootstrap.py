"""scripts/bootstrap.sh with a stand-in `.venv/bin/python`: pip failures stop it loudly, known noise is dropped."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# setuptools' box as pip prints it for an editable install (seen despite -q)
BOX = """  /tmp/pip-build-env-x/overlay/lib/python3.11/site-packages/setuptools/command/editable_wheel.py:354: \
InformationOnly: Editable installation.
  !!

          ********************************************************************************
          Please be careful with folders in your working directory with the same
          name as your package as they may take precedence during imports.
          ********************************************************************************

  !!
    with strategy, WheelFile(wheel_path, "w") as wheel_obj:
"""
# A stand-in for .venv/bin/python: logs its arguments; `pip install` prints the box, or fails when the
# argument list contains $FAIL_ON; `-c` prints what the real check would.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then
    echo "ERROR: Could not find a version that satisfies the requirement libtpu==0.0.52" >&2
    exit 1
  fi
  cat "$(dirname "$0")/box.txt"
  echo "WARNING: a real warning that must stay visible"
  exit 0
fi
if [ "$1" = "-c" ]; then echo "qwen_edit_jax ready on cpu"; exit 0; fi
exit 3
"""


def _checkout(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(ROOT, "scripts", "bootstrap.sh"), tmp_path / "scripts" / "bootstrap.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "box.txt").write_text(BOX)
    return bin_dir


def _run(tmp_path, *args, **env):
    return subprocess.run(["bash", str(tmp_path / "scripts" / "bootstrap.sh"), *args], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=60)


def test_a_pip_failure_stops_bootstrap_loudly(tmp_path):
    bin_dir = _checkout(tmp_path)
    r = _run(tmp_path, "test", FAIL_ON=".[test]")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "ERROR: Could not find a version that satisfies the requirement libtpu" in r.stderr  # pip's own output
    assert "error: 'pip install -q -e .[test]' failed (exit status 1)" in r.stderr
    assert "ready" not in r.stdout  # nothing ran after the failed install
    calls = (bin_dir / "calls.log").read_text().splitlines()
    assert calls[-1] == "-m pip install -q -e .[test]"


@pytest.mark.parametrize("header", ["InformationOnly", "BuildBackendWarning: Editable installation."])
def test_noise_is_dropped_and_warnings_kept(tmp_path, header):
    bin_dir = _checkout(tmp_path)
    box = BOX if header == "InformationOnly" else "\n".join(
        line.replace("InformationOnly: Editable installation.", header) if "InformationOnly" in line else line
        for line in BOX.split("\n"))
    (bin_dir / "box.txt").write_text(box)
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "qwen_edit_jax ready on cpu" in r.stdout
    assert header not in r.stdout and "****" not in r.stdout and "!!" not in r.stdout
    assert "with strategy" not in r.stdout
    assert r.stdout.count("WARNING: a real warning that must stay visible") == 2  # pip upgrade + install


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_accelerator_installs_pull_their_jax_extra(tmp_path, target):
    bin_dir = _checkout(tmp_path)
    r = _run(tmp_path, target)
    assert r.returncode == 0, r.stderr
    calls = (bin_dir / "calls.log").read_text().splitlines()
    assert f"-m pip install -q -e .[{target}]" in calls and "-m pip install -q torch==2.13.0" not in calls


def test_an_unknown_argument_is_refused(tmp_path):
    _checkout(tmp_path)
    r = _run(tmp_path, "cuda")
    assert r.returncode == 2 and "usage: bash scripts/bootstrap.sh [test|gpu|tpu]" in r.stderr


def test_no_venv_installs_into_the_given_python(tmp_path):
    """`NO_VENV=1 PYTHON=…` (the notebook, into its kernel's Python): the same installs, no .venv made."""
    bin_dir = _checkout(tmp_path)
    kernel = tmp_path / "kernel"
    shutil.move(bin_dir, kernel)
    shutil.rmtree(tmp_path / ".venv")
    r = _run(tmp_path, "tpu", NO_VENV="1", PYTHON=str(kernel / "python"))
    assert r.returncode == 0, r.stderr
    assert "-m pip install -q -e .[tpu]" in (kernel / "calls.log").read_text().splitlines()
    assert not (tmp_path / ".venv").exists()
