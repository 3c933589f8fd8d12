"""Preemption (SIGTERM): the watcher, the bounded save, and two `jax.distributed` processes on localhost that
stop at the same step, save it together, exit with status 75 and resume to the uninterrupted run's LoRA.

The single-process SIGTERM runs (one notice; a second one during the save) are part of
tests/test_training_loop.py::test_kill_or_preempt_anywhere_and_resume_is_bit_identical.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from qwen_edit_jax.parallel.preemption import EXIT_PREEMPTED, PreemptionWatcher
from tests.test_training_loop import (PREEMPTED_LINE, ROOT, _cfg_dict, _ended, _lines, _read_metrics, _steps,
                                      _wait_until, assets)  # noqa: F401  (assets: the module fixture)


def test_a_sigterm_is_caught_once_and_the_handlers_come_back():
    """One process: the first SIGTERM sets the flag and puts the default action back (a second one would end the
    process); leaving the watcher restores what was there. SIGINT can be watched the same way, the second Ctrl-C
    then raising KeyboardInterrupt as usual."""
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as w:
        assert not w.synced and not w.should_stop(1)
        assert signal.getsignal(signal.SIGTERM) == w._on_signal
        os.kill(os.getpid(), signal.SIGTERM)
        assert w.should_stop(2) and w.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == before
    with PreemptionWatcher(signals=(signal.SIGINT,)) as w:
        assert signal.getsignal(signal.SIGTERM) == before  # not watched
        os.kill(os.getpid(), signal.SIGINT)
        assert w.should_stop(1) and w.received == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with PreemptionWatcher() as w:  # left without a signal: the handler is removed
        pass
    assert signal.getsignal(signal.SIGTERM) == before and not w.should_stop(1)


def test_a_save_past_its_deadline_ends_the_process_with_the_preemption_status():
    code = ("import time\nfrom qwen_edit_jax.parallel.preemption import deadline\n"
            "with deadline(5, lambda: print('unexpected')):\n    pass\n"
            "with deadline(0.2, lambda: print('too slow', flush=True)):\n    time.sleep(60)\nprint('not reached')")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_PREEMPTED and r.stdout == "too slow\n", (r.returncode, r.stdout, r.stderr[-2000:])
    assert time.monotonic() - t0 < 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(cfg_path, out, *args):
    """The same `train_lora.py` command on two `jax.distributed` processes (one CPU device each) on localhost."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "train/train_lora.py", "--config", str(cfg_path),
                                       "--output-dir", str(out), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(assets, tmp_path):
    """SIGTERM to process 1 of 2 once step 3 is logged: both processes finish the same step N, save it together,
    say so and exit with 75. The same command (on a new coordinator port, and with `--max-steps N+3` so that
    the test does not train 1000 steps: the constant learning rate does not depend on it) resumes, and the
    LoRA file and every step's loss equal those of an uninterrupted two-process run of N+3 steps, bit for bit."""
    d = _cfg_dict(assets, mesh={"enabled": True, "data": 2, "fsdp": 1, "tensor": 1},
                  train={"max_steps": 1000, "save_every": 1000, "log_every": 1})
    assert d["optim"].get("schedule", "constant") == "constant"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "preempted"
    run = _two_processes(cfg_path, out)
    _wait_until(run[0], "step 3's metrics", lambda: _lines(out) >= 3)
    run[1].send_signal(signal.SIGTERM)
    errs = [_ended(p, EXIT_PREEMPTED) for p in run]
    complete, unfinished = _steps(out)
    stop = complete[-1]
    assert complete == [stop] and 3 < stop < 1000 and unfinished == [], (complete, unfinished)
    for err in errs:  # each process stopped after that step, and its save finished
        assert err.strip().splitlines()[-1] == PREEMPTED_LINE.format(stop), err[-3000:]
    assert _lines(out) == stop and not (out / "lora_diffusers.safetensors").exists()

    steps = ("--max-steps", str(stop + 3))
    resumed, ref = _two_processes(cfg_path, out, *steps), _two_processes(cfg_path, ref_out, *steps)
    errs = [_ended(p, 0) for p in resumed]
    assert f"resuming from {out / 'checkpoints'}/{stop} (step {stop})" in errs[0], errs[0][-3000:]
    for p in ref:
        _ended(p, 0)
    assert (out / "lora_diffusers.safetensors").read_bytes() == (ref_out / "lora_diffusers.safetensors").read_bytes()
    got, want = _read_metrics(out), _read_metrics(ref_out)
    assert [r["step"] for r in got] == list(range(1, stop + 4))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
