"""Training checkpoints with Orbax: LoRA params, optimiser state, step, data position and RNG.

An optimiser state with an EMA (`training.ema.EmaState`) is saved as two items: the wrapped
optimiser's state as `opt_state` (the same item as without EMA) and `ema` (the averaged adapters and
the update count).

Orbax writes each step into a temporary directory and renames it when every item is on disk, so
a process killed mid-save leaves only a temporary directory, which is ignored (and removed) on
the next start; resuming picks the newest *complete* step. Only the last `keep` steps are kept,
and an older one is deleted only after a newer one is complete. On a `gs://` bucket (no rename) Orbax
writes the step's objects in place and its `commit_success.txt` last; a step without it is not complete.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..utils import storage
from .ema import EmaState

class TrainCheckpointer:
    """Save / restore the training state under `directory/<step>/{lora, opt_state, meta[, ema]}`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = storage.normalize(directory)  # a local folder or a gs:// prefix
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(storage.as_path(self.directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Start saving `step` (asynchronously when enabled; the arrays are copied before returning)."""
        items = {}
        if isinstance(opt_state, EmaState):
            items["ema"] = ocp.args.StandardSave({"params": opt_state.ema, "count": opt_state.count})
            opt_state = opt_state.opt
        self.manager.save(
            step,
            args=ocp.args.Composite(
                lora=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
                **items,
            ),
            force=True,
        )

    def restore(self, step: int, params_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restore `step` into the structure, shapes, dtypes and shardings of the given trees (an `EmaState`
        restores the `ema` item too: check `has_ema(step)` first)."""

        def abstract(tree):
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)

        ema_like = opt_state_like if isinstance(opt_state_like, EmaState) else None
        items = {}
        if ema_like is not None:
            items["ema"] = ocp.args.StandardRestore(abstract({"params": ema_like.ema, "count": ema_like.count}))
            opt_state_like = ema_like.opt
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                lora=ocp.args.StandardRestore(abstract(params_like)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
                meta=ocp.args.JsonRestore(),
                **items,
            ),
        )
        opt_state = out["opt_state"]
        if ema_like is not None:
            opt_state = EmaState(opt_state, out["ema"]["params"], out["ema"]["count"])
        return out["lora"], opt_state, dict(out["meta"])

    def has_ema(self, step: int) -> bool:
        """Whether checkpoint `step` holds an `ema` item (saved with `train.ema_decay` set)."""
        return storage.isdir(storage.join(self.directory, str(step), "ema"))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
