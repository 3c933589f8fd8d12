"""The multi-host launchers and the docs: configs they name exist, a missing one fails before any host is contacted."""

from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_REF = re.compile(r"train/configs/[\w.-]+\.ya?ml")


def test_every_config_named_in_docs_and_scripts_exists():
    files = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md")),
             *glob.glob(os.path.join(ROOT, "train", "*.sh")), *glob.glob(os.path.join(ROOT, "train", "*.py"))]
    named = {(os.path.relpath(f, ROOT), ref) for f in files for ref in CONFIG_REF.findall(open(f).read())}
    assert named  # the pattern still finds the references
    missing = sorted((f, ref) for f, ref in named if not os.path.isfile(os.path.join(ROOT, ref)))
    assert not missing, missing


@pytest.mark.parametrize("script,args", [
    ("launch_tpu_pod.sh", ["my-tpu", "us-west4-a"]),
    ("launch_gpu_multinode.sh", []),
])
def test_launchers_check_the_config_before_contacting_hosts(script, args, tmp_path):
    env = dict(os.environ, DRY_RUN="1", HOSTS="node0,node1", PATH=f"{tmp_path}:{os.environ['PATH']}")
    # stand-ins that record any use: nothing may reach gcloud / ssh when the config is missing
    for tool in ("gcloud", "ssh"):
        stub = tmp_path / tool
        stub.write_text(f"#!/bin/sh\necho called >> {tmp_path}/{tool}.log\n")
        stub.chmod(0o755)
    cmd = ["bash", os.path.join(ROOT, "train", script), *args]
    r = subprocess.run(cmd + ["train/configs/edit.yaml", "--output-dir", "/shared/run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: config train/configs/edit.yaml not found" in r.stderr, r.stderr
    assert "train/configs/qwen-image-edit.yaml" in r.stderr  # names what exists
    assert r.stdout == "" and not list(tmp_path.glob("*.log"))
    ok = subprocess.run(cmd + ["train/configs/qwen-image-edit.yaml", "--output-dir", "/shared/run"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "train_lora.py" in ok.stdout and "qwen-image-edit.yaml" in ok.stdout  # the dry run's command
