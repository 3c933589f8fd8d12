"""`train/train_lora.py` that SIGKILLs itself at a chosen moment; run by tests/test_training_loop.py.

    python tests/train_kill_worker.py WHERE [train_lora.py arguments ...]

WHERE is one of
  metrics:N  half of step N's metrics.jsonl line is written (and flushed), then the kill: a line cut
             by the kill, with the run's first complete checkpoint not yet written when N=1;
  export     every checkpoint is complete (the last one included), the LoRA file not yet written.
(Kills and SIGTERMs in the middle of a checkpoint save come from outside, on the plain command: the test
watches the checkpoint folder for Orbax's unfinished `<step>.orbax-checkpoint-tmp-*` folder.) Everything
else is the real command.
"""

from __future__ import annotations

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
sys.path.insert(0, ROOT)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    where, argv = sys.argv[1], sys.argv[2:]
    from qwen_edit_jax.utils.accelerators import cpu_unless_accelerator

    cpu_unless_accelerator()  # as train_lora.main does first
    from qwen_edit_jax.training import loop, run_log

    if where.startswith("metrics:"):
        step = int(where.split(":")[1])
        write = run_log.MetricsLog.write

        def cut_write(self, rec):
            if rec.get("step") != step:
                return write(self, rec)
            import json

            line = json.dumps(rec) + "\n"
            self._f.write(line[: len(line) // 2])
            self._f.flush()
            _die()

        run_log.MetricsLog.write = cut_write
    elif where == "export":
        loop.export_lora = lambda *a, **k: _die()
    else:
        raise SystemExit(f"unknown kill point {where!r}")
    import train_lora

    return train_lora.main(argv)


if __name__ == "__main__":
    sys.exit(main())
