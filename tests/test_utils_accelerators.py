"""The command-line tools' platform default: CPU exactly when no accelerator device node exists and the user set nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qwen_edit_jax.utils.accelerators import accelerator_nodes, cpu_unless_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("nodes,found", [
    ([], []),
    (["null", "tty0"], []),
    (["accel0", "accel1"], ["accel0", "accel1"]),  # TPU v2–v5e
    (["vfio/vfio", "vfio/0"], ["vfio/0"]),  # TPU v5p / v6e behind vfio-pci (the control node alone is not one)
    (["nvidiactl", "nvidia0"], ["nvidia0"]),  # NVIDIA GPU
    (["kfd"], ["kfd"]),  # AMD GPU
])
def test_accelerator_nodes(tmp_path, nodes, found):
    for n in nodes:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).touch()
    assert accelerator_nodes(str(tmp_path)) == sorted(str(tmp_path / f) for f in found)


def test_cpu_default_only_without_accelerators_and_without_a_user_choice(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    (tmp_path / "nvidia0").touch()
    assert cpu_unless_accelerator(str(tmp_path)) is None and "JAX_PLATFORMS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "")  # set, even empty: the user's choice
    assert cpu_unless_accelerator(str(tmp_path / "empty")) is None and os.environ["JAX_PLATFORMS"] == ""


def test_a_fresh_process_on_a_cpu_machine_is_quiet(tmp_path):
    """Before any backend starts, even with jax already imported: CPU selected, no libtpu probe output."""
    code = ("import sys, jax; from qwen_edit_jax.utils.accelerators import cpu_unless_accelerator; "
            f"print(cpu_unless_accelerator({str(tmp_path)!r})); print(jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpu", "cpu"]
    assert "TPU" not in r.stderr and "InitGoogle" not in r.stderr, r.stderr
