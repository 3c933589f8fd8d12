"""The multi-host launchers and the docs: configs they name exist, a missing one fails before any host is contacted;
the TPU launcher installs what the README says and reruns a preempted run."""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import tomllib

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


def _readme_install(machine: str) -> str:
    """The command of README.md's "Install for real work" row for `machine`."""
    for line in open(os.path.join(ROOT, "README.md")):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == machine:
            return re.fullmatch(r"`([^`]+)`", cells[1]).group(1)
    raise AssertionError(f"README.md has no install row for {machine}")


def test_the_tpu_launcher_installs_what_the_readme_says(tmp_path):
    """`SETUP=1` runs exactly the README's TPU install on every worker (`bash scripts/bootstrap.sh tpu`: jax[tpu] and
    the libtpu it pins), and so does the notebook on a TPU runtime; the AOT-plan libtpu of the `tpu-plan` / `test`
    extras is never among them."""
    readme = _readme_install("TPU VM")
    assert readme == "bash scripts/bootstrap.sh tpu"
    env = dict(os.environ, DRY_RUN="1", SETUP="1")
    r = subprocess.run(["bash", os.path.join(ROOT, "train", "launch_tpu_pod.sh"), "my-tpu", "us-west4-a",
                        "train/configs/qwen-image-edit.yaml", "--output-dir", "/shared/run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    remote = [a[a.index("--command") + 1] for a in map(shlex.split, r.stdout.splitlines()) if "--command" in a]
    setup = [c for c in remote if "train_lora.py" not in c]
    assert len(setup) == 1, remote
    cd, *install = [part.strip() for part in setup[0].split("&&")]
    assert cd == "cd ~/qwen-edit-jax" and install == [readme], setup
    assert "tpu-plan" not in r.stdout and "pip" not in r.stdout
    # the notebook installs through the same script, with the runtime's kind (tpu / gpu / none for CPU)
    nb = json.load(open(os.path.join(ROOT, "notebooks", "qwen_image_edit_lora.ipynb")))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert '["bash", "scripts/bootstrap.sh", *target]' in code and 'target = [KIND] if KIND in ("tpu", "gpu")' in code
    assert "pip install" not in code and '"-m", "pip"' not in code
    # `.[tpu]` (what bootstrap.sh tpu installs) is jax[tpu]; its libtpu is not the AOT-plan one
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    plan_libtpu = [d for d in extras["tpu-plan"] if d.startswith("libtpu")]
    assert extras["tpu"] == ["jax[tpu]==0.10.2"] and plan_libtpu and plan_libtpu[0] in extras["test"]
    jax_tpu = [d for d in importlib.metadata.requires("jax") if d.startswith("libtpu") and 'extra == "tpu"' in d]
    assert jax_tpu and plan_libtpu[0].split("==")[1] not in jax_tpu[0], (jax_tpu, plan_libtpu)


# A stand-in for gcloud: the training ssh plays the next outcome of outcomes.txt ("75 75": two workers print their
# exit status; "gone": the ssh fails without any), `describe` the next line of states.txt; every call is logged.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
d=$(dirname "$0")
echo "$*" >> "$d/calls.log"
if [[ "$*" == *"describe"* ]]; then
  head -n 1 "$d/states.txt"; sed -i 1d "$d/states.txt"; exit 0
fi
if [[ "$*" == *"train_lora.py"* ]]; then
  outcome=$(head -n 1 "$d/outcomes.txt"); sed -i 1d "$d/outcomes.txt"
  [ "$outcome" = gone ] && { echo "ssh: connect to host 10.0.0.2 port 22: Connection refused" >&2; exit 255; }
  for s in $outcome; do echo "step ..."; echo "qwen-edit-jax-exit-status=$s"; done
  exit 0
fi
"""


@pytest.mark.parametrize("outcomes,states,restart,status,runs", [
    (["75 75", "gone", "0 0"], ["PREEMPTED", "READY", "READY"], 2, 0, 3),  # preempted, VMs gone, done
    (["0 75"], [], 0, 75, 1),  # preempted without RESTART: the status is passed on
    (["75 75", "2 2"], ["READY"], 3, 2, 2),  # a real error after a restart is not retried
    (["gone", "gone"], ["READY"], 1, 75, 2),  # still preempted after the last rerun
])
def test_the_tpu_launcher_reruns_a_preempted_run(tmp_path, outcomes, states, restart, status, runs):
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    (tmp_path / "outcomes.txt").write_text("\n".join(outcomes) + "\n")
    (tmp_path / "states.txt").write_text("".join(s + "\n" for s in states))
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", RESTART=str(restart), SETUP="1", POLL_S="0")
    r = subprocess.run(["bash", os.path.join(ROOT, "train", "launch_tpu_pod.sh"), "my-tpu", "us-west4-a",
                        "train/configs/qwen-image-edit.yaml", "--output-dir", "/shared/run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == status, (r.stdout, r.stderr)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert sum("train_lora.py" in c for c in calls) == runs, calls
    assert sum("bootstrap.sh tpu" in c for c in calls) == runs  # a recreated VM is set up again
    assert sum("describe" in c for c in calls) == len(states) and (tmp_path / "states.txt").read_text() == ""
