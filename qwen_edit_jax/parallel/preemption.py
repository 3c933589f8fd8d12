"""Preemption: a training loop asks once per step "stop now?", and every host gets the same answer at the same step.

Cloud TPU and Compute Engine send SIGTERM before a preemption (spot / preemptible VMs: about 30 s before
the VM stops) or a maintenance event. `PreemptionWatcher.should_stop(step)` turns that notice into a
step at which the loop saves a checkpoint and exits with `EXIT_PREEMPTED`:

- **Several processes** (`jax.distributed` running, `jax.process_count() > 1`): JAX's preemption
  notifier catches SIGTERM in whichever process receives it, and the coordination service agrees on
  the next step every process will reach; `jax.experimental.multihost_utils.reached_preemption_sync_point`
  returns True there, in every process at the same step. It must be called at every step, in every
  process, with the global step (Orbax's `CheckpointManager.save` calls it with the global step too).
  The watcher registers the starting step as soon as it is made, so a notice that arrives early in a
  resumed run names a step the run will reach.
- **One process** (no `jax.distributed`): the watcher installs its own handler for `signals`, which sets
  a flag checked between steps.

After the first signal the handler that was there before is put back (for SIGTERM: the default
action), so a second SIGTERM ends the process at once, even in the middle of the checkpoint save;
Orbax writes into a temporary folder and renames it when complete, so the previous complete
checkpoint stays the one a rerun resumes from. `deadline()` bounds the save the same way: past its
timeout the process exits with `EXIT_PREEMPTED` whatever the save is doing (a host that went away
would otherwise leave the others waiting in a collective save forever).

Only SIGTERM is watched by default. `signals` takes more (SIGINT for Ctrl-C) in a single process;
across processes JAX's notifier covers SIGTERM only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils

# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"): the run was preempted after
# saving a checkpoint; the same command resumes it. train/launch_tpu_pod.sh restarts on this status.
EXIT_PREEMPTED = 75
DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM,)


class PreemptionWatcher:
    """Answers `should_stop(step)` after each training step; a context manager that installs and removes
    the single-process signal handlers.

    `synced`: use JAX's multi-host sync point (default: when `jax.distributed` runs with more than one
    process). `start`: the step the loop starts from (registered with the sync point at once).
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, *, start: int = 0, synced: bool | None = None):
        self.signals = tuple(signals)
        self.synced = (jax.distributed.is_initialized() and jax.process_count() > 1) if synced is None else synced
        self.received: int | None = None  # the first watched signal received (single process)
        self._previous: dict[int, Any] = {}  # handlers to put back
        if self.synced:
            multihost_utils.reached_preemption_sync_point(start)  # so a notice before step 1 names a later step

    def __enter__(self) -> PreemptionWatcher:
        if not self.synced and _on_main_thread():  # Python runs signal handlers on the main thread only
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after global step `step` (call it after every step, in every process).
        Once True, a second signal ends the process at once."""
        if self.synced:
            stop = multihost_utils.reached_preemption_sync_point(step)
            if stop and _on_main_thread():
                # JAX's notifier keeps catching SIGTERM; from now on the default action ends the process
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            return stop
        return self.received is not None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        signal.signal(signum, _handler_to_restore(self._previous.pop(signum, None)))  # a second one is not caught

    def _restore(self) -> None:
        while self._previous:
            s, handler = self._previous.popitem()
            signal.signal(s, _handler_to_restore(handler))


@contextlib.contextmanager
def deadline(seconds: float, on_timeout: Callable[[], None]) -> Iterator[None]:
    """Run the body; if it is still running after `seconds`, call `on_timeout()` (from another thread) and end
    the process with `EXIT_PREEMPTED` without waiting for anything (a save in progress stays unfinished and
    is ignored on resume)."""

    def expire() -> None:
        try:
            on_timeout()
        finally:
            sys.stderr.flush()
            os._exit(EXIT_PREEMPTED)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _handler_to_restore(handler: Any) -> Any:
    """A handler recorded by `signal.signal` (None: one installed outside Python) as something to put back."""
    return signal.SIG_DFL if handler is None else handler


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
