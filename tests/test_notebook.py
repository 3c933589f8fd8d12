"""The Colab notebook runs top to bottom on the tiny path (`QWEN_EDIT_JAX_TINY=1`, no network).

Executed with nbclient in a fresh kernel, in a temporary working folder; any cell error fails the
test. It also checks what a user would look at: inline images, a LoRA file, a falling loss.
"""

from __future__ import annotations

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "qwen_image_edit_lora.ipynb")


@pytest.mark.slow
def test_notebook_runs_on_the_tiny_path(tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setenv("QWEN_EDIT_JAX_TINY", "1")
    monkeypatch.setenv("QWEN_EDIT_JAX_WORK", str(work))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is ipykernel's own kernel: this interpreter (the venv that has the project installed)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the first and last validation grids and the edited image are shown inline"
    m = re.search(r"loss ([\d.]+) \(first \d+ steps\) -> ([\d.]+)", text)
    assert m and float(m.group(2)) < float(m.group(1)), text[-2000:]
    assert (work / "runs" / "lora" / "lora_diffusers.safetensors").is_file()
    assert (work / "runs" / "lora" / "edited.png").is_file()
    assert sorted(os.listdir(tmp_path)) == ["work"], "the notebook writes only under its work folder"
