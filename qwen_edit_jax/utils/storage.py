"""Where inputs and outputs live: local paths and `gs://` buckets behind one small API.

Paths are plain strings; `as_path` gives an etils `epath.Path` (gcsfs serves `gs://`, the same stack
Orbax uses for its checkpoints). Object stores have no rename, so:

* one file is written atomically by uploading it whole (`write_bytes`, `upload_file`): a Cloud Storage
  object becomes visible only when its upload completes;
* a folder of several objects is complete only once its commit marker, written last, exists
  (`upload_tree`) — the rule Orbax follows with `commit_success.txt`.

Local paths keep the temporary-name-and-rename writes of `utils.files`. The clients find a bucket
(or an emulator) through their own standard settings: `STORAGE_EMULATOR_HOST` for gcsfs and the
google-cloud clients, `TENSORSTORE_GCS_HTTP_URL` for tensorstore; nothing here knows about tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import fsspec
from etils import epath

from .files import atomic_path, check_output_dir

REMOTE_PREFIX = "gs://"
_COPY_CHUNK = 16 << 20


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object in a bucket (`gs://bucket/…`)."""
    return os.fspath(path).startswith(REMOTE_PREFIX)


def check_scheme(path: str | os.PathLike, option: str) -> None:
    """Refuse, in one line naming `option`, a URL this project cannot write to or read from."""
    raw = os.fspath(path)
    if "://" in raw and not is_remote(raw):
        raise ValueError(f"{option} {raw}: only local paths and gs:// URLs are supported")


def normalize(path: str | os.PathLike) -> str:
    """A local path made absolute, or a `gs://` URL without a trailing slash."""
    raw = os.fspath(path)
    return raw.rstrip("/") if is_remote(raw) else os.path.abspath(raw)


def as_path(path: str | os.PathLike) -> epath.Path:
    """The `epath.Path` of a local path (absolute) or a `gs://` URL."""
    return epath.Path(normalize(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/…` for a local path or a URL."""
    base = os.fspath(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def check_output(path: str | os.PathLike, option: str) -> str:
    """`files.check_output_dir` for a local folder; for a `gs://` prefix (which has no parents to
    check) only the scheme. Returns the normalized path."""
    check_scheme(path, option)
    return normalize(path) if is_remote(path) else check_output_dir(path, option)


def exists(path: str | os.PathLike) -> bool:
    return as_path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    """A local folder, or a `gs://` prefix with at least one object under it."""
    return as_path(path).is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
    """Names directly under a folder or prefix (empty when it does not exist)."""
    p = as_path(path)
    return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def size(path: str | os.PathLike) -> int:
    """Bytes in one file or object."""
    return as_path(path).stat().length


def read_ranges(path: str | os.PathLike, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes `[start, end)` of each range of one file; for an object, only those bytes are fetched
    (HTTP range requests, sent concurrently by gcsfs)."""
    path = normalize(path)
    if is_remote(path):
        fs, name = fsspec.core.url_to_fs(path)
        return fs.cat_ranges([name] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])
    out = []
    with open(path, "rb") as f:
        for a, b in ranges:
            f.seek(a)
            out.append(f.read(b - a))
    return out


def read_bytes(path: str | os.PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return as_path(path).read_text()


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> str:
    """Write one file atomically (local: temporary name + rename; bucket: one whole-object upload)."""
    path = normalize(path)
    if is_remote(path):
        if not overwrite and exists(path):
            raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
        as_path(path).write_bytes(data)
        return path
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> str:
    return write_bytes(path, text.encode(), overwrite=overwrite)


def upload_file(local: str | os.PathLike, url: str, *, overwrite: bool = True) -> str:
    """Copy a complete local file to `url` (a bucket object or a local path), streaming it in chunks."""
    url = normalize(url)
    if not is_remote(url):
        with atomic_path(url, overwrite=overwrite) as tmp:
            shutil.copyfile(local, tmp)
        return url
    if not overwrite and exists(url):
        raise FileExistsError(f"{url} already exists; pass --overwrite (overwrite=True) to replace it")
    with open(local, "rb") as src, as_path(url).open("wb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
    return url


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """A local file name for a writer that needs one; on success it becomes `path`: a local `path` through
    `files.atomic_path` (temporary name + rename), a `gs://` object by one whole upload of the finished file."""
    path = normalize(path)
    if not is_remote(path):
        with atomic_path(path, overwrite=overwrite) as tmp:
            yield tmp
        return
    if not overwrite and exists(path):
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    with tempfile.TemporaryDirectory(prefix="qwen-edit-jax-upload-") as d:
        tmp = os.path.join(d, path.rsplit("/", 1)[-1])
        yield tmp
        upload_file(tmp, path)


def download_file(url: str, local: str | os.PathLike) -> str:
    """Copy the object (or file) at `url` to the local path `local`, atomically; returns `local`."""
    local = os.path.abspath(os.fspath(local))
    with atomic_path(local, overwrite=True) as tmp, as_path(url).open("rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
    return local


def _files_under(folder: str) -> Iterator[str]:
    """Relative paths of the files under a local folder, sorted."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield os.path.relpath(os.path.join(root, name), folder)


def upload_tree(local_dir: str | os.PathLike, url: str, *, marker: str) -> str:
    """Copy a complete local folder to the prefix `url`, its `marker` file last (the commit marker:
    readers take the prefix as complete only when the marker exists). Returns `url`."""
    local_dir = os.fspath(local_dir)
    url = normalize(url)
    rels = [r for r in _files_under(local_dir) if r != marker]
    if not os.path.isfile(os.path.join(local_dir, marker)):
        raise FileNotFoundError(f"{local_dir}: no {marker} to commit the upload with")
    for rel in rels + [marker]:
        upload_file(os.path.join(local_dir, rel), join(url, *rel.split(os.sep)))
    return url


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder or every object under a prefix (no error when absent)."""
    p = as_path(path)
    if p.exists():
        p.rmtree()
