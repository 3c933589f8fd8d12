"""Subprocess checks that start before their test reaches them.

Most of the suite runs in one pytest process that compiles on one core at a time; the checks that
need several simulated devices run in subprocesses of their own. A `Job` is such a subprocess, and a
test marked `@pytest.mark.background(JOB)` lets tests/conftest.py start it as soon as the test is
selected: one job at a time, in test order, on the core the pytest process leaves idle. The test
then takes `JOB.result()` (waiting if the job is still running, starting it at once if it has not
started) and asserts on it exactly as it would on `subprocess.run`'s result. Nothing a test checks
changes, only when the subprocess runs. A job's command, environment and working folder are fixed
when it is made (at collection), so no test's monkeypatching can reach it.

Under pytest-xdist (the suite's default, pyproject.toml) both cores run test workers and no job starts
ahead: the test's `JOB.result()` runs it when the test gets there (tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Job:
    """One subprocess (`cmd` run in `cwd` with `env` = os.environ + `env`), run at most once."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None, cwd: str = ROOT,
                 timeout: float = 900):
        self.name, self.cmd, self.cwd, self.timeout = name, list(cmd), cwd, timeout
        self.env = dict(os.environ, **(env or {}))
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._result: subprocess.CompletedProcess | None = None

    def __repr__(self) -> str:
        return f"Job({self.name!r})"

    def result(self) -> subprocess.CompletedProcess:
        """Run the job (unless it ran or is running) and return its `CompletedProcess` (text output)."""
        with self._lock:  # the scheduler thread holds it while the job runs there
            if self._result is None:
                self._proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
                try:
                    out, err = self._proc.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    out, err = self._proc.communicate()
                    err += f"\n[tests/background.py: {self.name} killed after {self.timeout} s]"
                self._result = subprocess.CompletedProcess(self.cmd, self._proc.returncode, out, err)
            return self._result

    def run_if_idle(self) -> None:
        """Run the job unless it ran, or is running elsewhere (a test took it first)."""
        if self._lock.acquire(blocking=False):
            self._lock.release()
            self.result()

    def kill(self) -> None:
        p = self._proc
        if p is not None and p.poll() is None:
            p.kill()


class Scheduler:
    """Runs jobs one after the other in a daemon thread (skipping one that a test is running already)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="background-jobs", daemon=True)

    def start(self) -> None:
        if self.jobs:
            self._thread.start()

    def _run(self) -> None:
        for job in self.jobs:
            if self._stop:
                return
            try:
                job.run_if_idle()
            except Exception as e:  # the test calling result() reports it
                print(f"tests/background.py: {job.name}: {e!r}", file=sys.stderr)

    def stop(self) -> None:
        self._stop = True
        for job in self.jobs:
            job.kill()
