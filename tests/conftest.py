"""Test-session setup: CPU only (the test extra installs libtpu for AOT plans, which would
otherwise make every JAX process probe for a TPU), the repo root on sys.path, and one JAX
persistent compilation cache per test session.

The cache: many tests compile the same programs (the tiny model's initialisation op by op, its
forward or LoRA step at the same shapes) in different tests and in the subprocesses they start
(kill-and-resume reruns, mesh workers), and compiling dominates the suite's time on CPU. The key
is XLA's program, flags and devices, so a hit is the very executable a fresh compile would
produce; nothing a test checks changes. The folder is fresh for each session (set through the
environment, so subprocesses share it) and removed at the end; set JAX_COMPILATION_CACHE_DIR
yourself to choose another one (then kept). Every program is cached, even one that compiles in
milliseconds (an eager op): a first eager initialisation of the tiny model takes ~6 s, ~1 s
from the cache. A size limit turns on the cache's file lock, so a process never reads an entry
that another one is still writing (several test processes run at once).
"""

import atexit
import os
import shutil
import tempfile
import uuid

import pytest

import gcs_emulator

os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:
    import filelock  # noqa: F401  (the cache's lock between processes; a dependency of torch)
except ImportError:  # no lock: no shared cache
    filelock = None
if filelock is not None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="qwen-edit-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))  # never reached; enables the lock


# ---- subprocess checks started ahead of their tests (tests/background.py) -------------------------------
_scheduler = None


def pytest_configure(config):
    config.addinivalue_line("markers", "background(job): start this test's subprocess `job` (tests/background.py "
                                       "Job) at the start of the session, one job at a time")


def _xdist_worker(config) -> bool:
    """True in a pytest-xdist worker process (the suite runs in two of them, see pyproject.toml)."""
    return hasattr(config, "workerinput")


def pytest_collection_modifyitems(config, items):
    """Under xdist (`--dist loadfile --no-loadscope-reorder`: one module at a time to a worker, in collection
    order), modules with more slow tests go first, then modules with more tests, so that the long ones start
    early and short ones fill the end. Tests within a module keep their order; each worker collects the
    same items and so sorts them the same way. Without xdist the order is pytest's own."""
    if not _xdist_worker(config):
        return
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def weight(path: str) -> tuple:
        its = modules[path]
        return -sum(1 for it in its if it.get_closest_marker("slow")), -len(its), path

    items[:] = [it for path in sorted(modules, key=weight) for it in modules[path]]


def pytest_collection_finish(session):
    global _scheduler
    if session.config.option.collectonly:
        return
    if _xdist_worker(session.config):
        # Every worker collects every test but runs only the modules it is sent, so no job starts ahead:
        # a test's `JOB.result()` runs its job when the test gets there, in the worker that runs the test's
        # module (all tests of a job are in one module, and --dist loadfile keeps a module on one worker),
        # while the other worker goes on with other modules.
        return
    from tests.background import Scheduler

    jobs = []
    for item in session.items:
        for mark in item.iter_markers("background"):
            jobs += [j for j in mark.args if all(j is not k for k in jobs)]
    _scheduler = Scheduler(jobs)
    _scheduler.start()


def pytest_sessionfinish(session, exitstatus):
    if _scheduler is not None:
        _scheduler.stop()


@pytest.fixture(scope="session")
def gcs_bucket():
    """`gs://bkt` on a Cloud Storage emulator, one per test process (clients cache the emulator's address)."""
    with gcs_emulator.start() as url:
        yield url


@pytest.fixture
def gcs_dir(gcs_bucket, request):
    """A fresh `gs://` prefix for one test."""
    return f"{gcs_bucket}/{request.node.name.replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"
