"""What a run logs: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event files.

`RunLog.scalars(step, record)` writes the record to both; `RunLog.image(tag, step, image)` goes to
TensorBoard only (the PNG files are written by the validation). TensorBoard events go to
`DIR/tensorboard/` through tensorboardX's `SummaryWriter` (no TensorFlow needed); scalars are grouped
as `train/…` and `validation/…`. On resume, both logs drop what came after the resumed step, so a
run killed after its last checkpoint shows no duplicated or orphaned points. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from ..utils.files import atomic_path

METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_VALIDATION_KEYS = ("validation_distance",)


class MetricsLog:
    """Append-only JSONL; on (re)start, lines after the resumed step are dropped (atomic rewrite)."""

    def __init__(self, path: str, keep_until: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill
                        continue
                    if rec.get("step", 0) <= keep_until:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with atomic_path(path, overwrite=True) as tmp, open(tmp, "w") as f:
            f.writelines(kept)
        self._f = open(path, "a")

    def write(self, rec: dict[str, Any]) -> None:
        if self.enabled:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled:
            self._f.close()


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a metrics key: `train/loss`, `validation/validation_distance`, …"""
    return f"validation/{key}" if key in _VALIDATION_KEYS else f"train/{key}"


class RunLog:
    """metrics.jsonl + (optionally) TensorBoard, for process 0; a no-op elsewhere."""

    def __init__(self, output_dir: str, *, resumed_step: int, enabled: bool, tensorboard: bool):
        self.metrics = MetricsLog(os.path.join(output_dir, METRICS), keep_until=resumed_step, enabled=enabled)
        self.writer = None
        if enabled and tensorboard:
            # purge_step: events at steps > the resumed one (written after the last checkpoint) are hidden
            self.writer = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR), purge_step=resumed_step + 1)

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        """One metrics.jsonl line `{"step": step, **record}`; its numeric scalars also to TensorBoard."""
        self.metrics.write({"step": step, **record})
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(scalar_tag(key), value, step)
        self.writer.flush()

    def image(self, tag: str, step: int, image: Image.Image) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()


__all__ = ["METRICS", "TENSORBOARD_DIR", "MetricsLog", "RunLog", "scalar_tag"]
