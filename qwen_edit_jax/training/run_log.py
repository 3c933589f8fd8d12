"""What a run logs: `metrics.jsonl` (one JSON object per logged step), TensorBoard event files and,
optionally, a Weights & Biases run.

`RunLog.scalars(step, record)` writes the record to all of them; `RunLog.image(tag, step, image)` goes to
TensorBoard and wandb (the PNG files are written by the validation). TensorBoard events go to
`DIR/tensorboard/` through tensorboardX's `SummaryWriter` (no TensorFlow needed); scalars are grouped
as `train/…` and `validation/…`. On resume, both logs drop what came after the resumed step, so a
run killed after its last checkpoint shows no duplicated or orphaned points. Only process 0 writes.

wandb (`log.wandb`, `pip install wandb`): the same tags as TensorBoard, files under `DIR/wandb/`, the run's
config; a resumed run continues the same wandb run (its id is kept in `DIR/wandb_run_id`). wandb cannot
drop points, so steps logged after the last checkpoint before a kill stay, and wandb ignores the rerun's
points at those steps.

On a `gs://` output dir: metrics.jsonl is rewritten whole at every write (objects cannot be appended to,
and the object must always be complete JSONL); tensorboardX writes its event files there itself (through
google-cloud-storage: it uploads the whole events file at each flush); wandb keeps its files in a local
temporary folder (it syncs them to its server), only the run id goes to the bucket.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from ..utils import storage
from .config import WandbSection

METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID = "wandb_run_id"
_VALIDATION_KEYS = ("validation_distance",)


class MetricsLog:
    """Append-only JSONL; on (re)start, lines after the resumed step are dropped (atomic rewrite).

    A local file is appended to; an object in a bucket is rewritten whole at each `write` (from the lines
    kept in memory), so it is complete JSONL at every moment."""

    def __init__(self, path: str, keep_until: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.remote = storage.is_remote(path)
        if not enabled:
            return
        kept = []
        if storage.exists(path):
            for line in storage.read_text(path).splitlines(keepends=True):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if rec.get("step", 0) <= keep_until:
                    kept.append(line if line.endswith("\n") else line + "\n")
        storage.write_text(path, "".join(kept))
        self._lines = kept if self.remote else None
        self._f = None if self.remote else open(path, "a")

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(rec) + "\n"
        if self.remote:
            self._lines.append(line)
            storage.write_text(self.path, "".join(self._lines))
        else:
            self._f.write(line)
            self._f.flush()

    def close(self) -> None:
        if self.enabled and self._f is not None:
            self._f.close()


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a metrics key: `train/loss`, `validation/validation_distance`, …"""
    return f"validation/{key}" if key in _VALIDATION_KEYS else f"train/{key}"


def open_wandb(output_dir: str, cfg: WandbSection, config: dict[str, Any] | None, resumed: bool) -> Any:
    """A wandb run writing under `output_dir/wandb` (a bucket: under a local temporary folder); a resumed run
    continues the run id kept in the output dir."""
    try:
        import wandb  # optional: only runs with log.wandb need it
    except ImportError:
        raise ImportError("log.wandb is set but the wandb package is not installed: pip install wandb "
                          "(or pip install 'qwen-edit-jax[wandb]')") from None
    id_path = storage.join(output_dir, WANDB_ID)
    run_id = None
    if resumed and storage.exists(id_path):
        run_id = storage.read_text(id_path).strip() or None
    files = tempfile.mkdtemp(prefix="qwen-edit-jax-wandb-") if storage.is_remote(output_dir) else output_dir
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, mode=cfg.mode, dir=files,
                     config=config, id=run_id, resume="allow" if run_id else None)
    storage.write_text(id_path, run.id + "\n")
    return run


def _numeric(key: str, value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"


class RunLog:
    """metrics.jsonl + (optionally) TensorBoard and wandb, for process 0; a no-op elsewhere."""

    def __init__(self, output_dir: str, *, resumed_step: int, enabled: bool, tensorboard: bool,
                 wandb: WandbSection | None = None, config: dict[str, Any] | None = None):
        self.metrics = MetricsLog(storage.join(output_dir, METRICS), keep_until=resumed_step, enabled=enabled)
        self.writer = self.wandb = None
        if enabled and tensorboard:
            # purge_step: events at steps > the resumed one (written after the last checkpoint) are hidden
            self.writer = SummaryWriter(storage.join(output_dir, TENSORBOARD_DIR), purge_step=resumed_step + 1)
        if enabled and wandb is not None:
            self.wandb = open_wandb(output_dir, wandb, config, resumed=resumed_step > 0)

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        """One metrics.jsonl line `{"step": step, **record}`; its numeric scalars also to TensorBoard and wandb."""
        self.metrics.write({"step": step, **record})
        numeric = {scalar_tag(k): v for k, v in record.items() if _numeric(k, v)}
        if self.writer is not None:
            for tag, value in numeric.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def image(self, tag: str, step: int, image: Image.Image) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image.convert("RGB"))}, step=step)

    def close(self) -> None:
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


__all__ = ["METRICS", "TENSORBOARD_DIR", "WANDB_ID", "MetricsLog", "RunLog", "open_wandb", "scalar_tag"]
