"""The two-host run of tests/test_caching_cli.py, as a tests/background.py job.

`python tests/caching_two_hosts.py OUT` writes the tiny Edit-Plus repo and the dataset of that test module's
`reference` fixture under OUT (both seeded: the same files), then runs train/cache_dataset.py as 2 processes
× 2 CPU devices meeting through jax.distributed (the default FSDP mesh over all 4) into OUT/cache. Prints
`RESULT {"ok": ..., "cache": path, "runs": [[returncode, stdout, stderr], ...]}`; never asserts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]


def main(out: str) -> dict:
    from qwen_edit_jax.testing.repo import write_tiny_edit_repo
    from test_caching_cli import ROOT, SCRIPT, reference_args

    repo = str(write_tiny_edit_repo(os.path.join(out, "repo", "edit"), "edit"))
    args = reference_args(os.path.join(out, "data"), repo)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    cache = os.path.join(out, "cache")
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *args, "--output", cache, "--no-progress",
                                       "--batch-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=ROOT))
    runs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        runs.append([p.returncode, stdout, stderr])
    return {"ok": True, "cache": cache, "runs": runs}


if __name__ == "__main__":
    try:
        result = main(sys.argv[1])
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
    print("RESULT " + json.dumps(result), flush=True)
