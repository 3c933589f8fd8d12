"""Fixture folders are written once and reused: a hidden manifest records the settings that made one.

A destination that holds a finished output with the same settings is reused; one that is absent is
written (atomically, by the caller); anything else there is an error, never overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST = ".demo.json"  # hidden: the folder layout reader skips dot-files


def reuse(dest: str | os.PathLike, manifest: dict[str, Any]) -> bool:
    """True when `dest` holds a finished output made with `manifest`'s settings; False when it is
    absent; `FileExistsError` for anything else there. `manifest["kind"]` names the output in the error."""
    dest = Path(dest)
    if not os.path.lexists(dest):
        return False
    try:
        found = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        found = None
    if found != manifest:
        settings = ", ".join(f"{k}={v!r}" for k, v in manifest.items() if k != "kind")
        was = "it was written with other settings" if isinstance(found, dict) and found.get("kind") == \
            manifest["kind"] else f"no {MANIFEST} of a finished demo {manifest['kind']} there"
        raise FileExistsError(f"{dest} exists but is not the demo {manifest['kind']} for {settings} ({was}); "
                              f"remove it or choose another folder")
    return True


def mark_finished(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Record `manifest` in `folder` (last, once the output is complete)."""
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2))


__all__ = ["MANIFEST", "mark_finished", "reuse"]
