"""Every run tests/test_sharding_multihost.py checks, made in one go (a tests/background.py job).

`python tests/multihost_runs.py` writes a random tiny checkpoint and a cached dataset to a temporary
folder, then trains the same LoRA three ways at once: 1 process × 8 devices and 2 processes × 4 devices
(tests/multihost_worker.py, both on a (2, 2, 2) mesh) and, in this process, on one device without a
mesh. Prints `RESULT {"ok": ..., "single": {...}, "multi": [{...}, {...}], "one": {...}}`; never asserts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(pid: int, nproc: int, port: int, ckpt: str, out: str, cache: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // nproc}", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, WORKER, str(pid), str(nproc), str(port), ckpt, out, cache],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"ok": False, "error": f"worker printed no result (rc={p.returncode}):\n{err[-4000:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def runs(root: str) -> dict:
    import qwen_edit_jax as q
    from qwen_edit_jax.training import load_config, train
    from qwen_edit_jax.cache_format import write_cache
    from qwen_edit_jax.testing.latent import LatentDemo, demo_samples
    from tests.multihost_worker import export_numbers, losses_of, train_overrides
    from tests.torch_reference import make_torch_model, save_torch_model

    ckpt = save_torch_model(make_torch_model(q.preset("tiny"), seed=3), os.path.join(root, "ckpt"), sharded=True)
    cache = os.path.join(root, "cache")
    write_cache(cache, demo_samples(LatentDemo(num_samples=16, latent_sizes=((8, 8),)), 16, 64))
    port = _free_port()
    procs = [_launch(0, 1, 0, ckpt, os.path.join(root, "out1"), cache)]
    procs += [_launch(i, 2, port, ckpt, os.path.join(root, "out2"), cache) for i in range(2)]
    try:
        res = train(load_config(None, train_overrides(ckpt, cache, mesh=False)), os.path.join(root, "one"),
                    log=lambda _m: None)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    single, *multi = [_result(p) for p in procs]
    one = {"losses": losses_of(os.path.join(root, "one")), **export_numbers(res.lora_files[0])}
    bad = [r["error"] for r in (single, *multi) if not r["ok"]]
    return {"ok": not bad, "error": "\n".join(bad), "single": single, "multi": multi, "one": one}


def main() -> None:
    root = tempfile.mkdtemp(prefix="multihost-")
    try:
        result = runs(root)
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
