"""Atomic outputs: write to a temporary name beside the target, rename when complete.

Used by every writer in the project (checkpoints, caches, LoRA files, samples, reports; Orbax's own
training checkpoints aside), so a failed or killed run never leaves a half-written file under the
final name. `atomic_path` gives the temporary name and commits it; `move_into_place` commits a
folder a writer filled under a name of its own (the resumable cache's `OUTPUT.partial/`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


def default_mode(path: str | os.PathLike) -> None:
    """Give a file the mode a plain `open(path, "w")` would: 0o666 minus the umask.

    Some writers (safetensors' `save_file`) create files 0o600 whatever the umask; outputs meant
    to be shared (caches, samples, checkpoints) get the usual permissions back.
    """
    os.chmod(path, 0o666 & ~_UMASK)


def check_output_dir(path: str | os.PathLike, option: str) -> str:
    """Refuse, in one line naming `option`, an output folder that cannot be one; return its absolute path.

    An existing file at `path`, or a file anywhere above it, is an error (before anything is
    written); a missing folder is fine (it is created later).
    """
    raw = os.fspath(path)
    if "://" in raw:
        raise NotADirectoryError(f"{option} {raw}: URLs are not supported; use a mounted path "
                                 f"(e.g. NFS, Filestore or gcsfuse)")
    path = os.path.abspath(raw)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{option} {path}: is a file, not a folder; choose a folder path")
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):  # the nearest existing ancestor ('/' at the latest)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{option} {path}: {parent} is a file, so no folder can be made under it")
    return path


def check_target(path: str, overwrite: bool, *, exists: Callable[[str], bool] = os.path.lexists) -> None:
    """Refuse to touch an existing output unless `overwrite` (`exists`: how to look, e.g. in a bucket)."""
    if not overwrite and exists(path):
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False, is_dir: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure delete it.

    With `overwrite`, an existing `path` is moved aside first and removed only after the new
    output has been renamed into place, so a failure never leaves neither.
    """
    path = os.path.abspath(os.fspath(path))
    check_target(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(path)
    if is_dir:
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        os.chmod(tmp, 0o777 & ~_UMASK)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        if not is_dir:
            default_mode(tmp)  # the writer may have re-created the file with its own mode
        move_into_place(tmp, path, overwrite=overwrite)
        tmp = None
    finally:
        if tmp is not None:
            _remove(tmp)


def move_into_place(src: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Rename the complete output `src` (a file or folder beside `path`) to `path`; returns `path`.

    With `overwrite`, an existing `path` is moved aside first and removed only after `src` has been
    renamed into place, so a failure never leaves neither.
    """
    path = os.path.abspath(os.fspath(path))
    check_target(path, overwrite)
    old = None
    if os.path.lexists(path):
        old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
    os.rename(src, path)
    if old is not None:
        _remove(old)
    return path


def _remove(p: str) -> None:
    for _ in range(3):  # a background writer may still be closing files
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)
        if not os.path.lexists(p):
            return
