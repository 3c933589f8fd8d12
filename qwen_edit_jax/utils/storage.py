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

import concurrent.futures
import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence

from etils import epath
from etils.epath import backend as epath_backend
from tqdm.auto import tqdm

from .files import atomic_path, check_output_dir, check_target

REMOTE_PREFIX = "gs://"
_COPY_CHUNK = 16 << 20
_DOWNLOADS = 8  # files downloaded at once by `local_copy`


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


def refresh(path: str | os.PathLike) -> None:
    """Forget gcsfs's cached listings at and under a `gs://` path (another process or tensorstore may have
    written there since this process listed it); nothing to do for a local path."""
    if is_remote(path):
        _fs(path).invalidate_cache(_object_name(path))


def _fs(path: str | os.PathLike):
    """The fsspec filesystem epath uses for `path` (gcsfs for `gs://`): one client, one listing cache."""
    return epath_backend.fsspec_backend.fs(os.fspath(path))


def _object_name(path: str | os.PathLike) -> str:
    """`bucket/name` of a `gs://` URL, as gcsfs names objects."""
    return normalize(path)[len(REMOTE_PREFIX):]


def exists(path: str | os.PathLike) -> bool:
    return as_path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    """A local folder, or a `gs://` prefix with at least one object under it."""
    return as_path(path).is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
    """Names directly under a folder or prefix (empty when it does not exist), listed afresh."""
    refresh(path)
    p = as_path(path)
    return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def size(path: str | os.PathLike) -> int:
    """Bytes in one file or object."""
    return as_path(path).stat().length


def files_under(path: str | os.PathLike) -> list[str]:
    """Relative paths (`/`-separated) of every file under a folder or prefix, sorted, listed afresh; empty when
    absent."""
    refresh(path)
    p = as_path(path)
    if not p.is_dir():
        return []
    base = os.fspath(p).removeprefix(REMOTE_PREFIX)
    out = []
    for root, _, files in p.walk():  # gcsfs gives the roots without the scheme
        rel = posixpath.relpath(os.fspath(root).removeprefix(REMOTE_PREFIX), base).replace(os.sep, "/")
        out += [name if rel == "." else f"{rel}/{name}" for name in files]
    return sorted(out)
def read_ranges(path: str | os.PathLike, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes `[start, end)` of each range of one file; for an object, only those bytes are fetched
    (HTTP range requests, sent concurrently by gcsfs)."""
    path = normalize(path)
    if is_remote(path):
        return _fs(path).cat_ranges([_object_name(path)] * len(ranges), [a for a, _ in ranges],
                                    [b for _, b in ranges])
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
        check_target(path, overwrite, exists=exists)
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
    check_target(url, overwrite, exists=exists)
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
    check_target(path, overwrite, exists=exists)
    with tempfile.TemporaryDirectory(prefix="qwen-edit-jax-upload-") as d:
        tmp = os.path.join(d, path.rsplit("/", 1)[-1])
        yield tmp
        upload_file(tmp, path)


def download_file(url: str, local: str | os.PathLike, *, on_bytes: Callable[[int], None] | None = None) -> str:
    """Copy the object (or file) at `url` to the local path `local`, atomically; returns `local`.
    `on_bytes(n)` is called after each chunk (progress bars)."""
    local = os.path.abspath(os.fspath(local))
    with atomic_path(local, overwrite=True) as tmp, as_path(url).open("rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(_COPY_CHUNK):
            dst.write(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return local


def upload_tree(local_dir: str | os.PathLike, url: str, *, marker: str) -> str:
    """Copy a complete local folder to the prefix `url`, its `marker` file last (the commit marker:
    readers take the prefix as complete only when the marker exists). Returns `url`."""
    local_dir = os.fspath(local_dir)
    url = normalize(url)
    rels = [r for r in files_under(local_dir) if r != marker]
    if not os.path.isfile(os.path.join(local_dir, marker)):
        raise FileNotFoundError(f"{local_dir}: no {marker} to commit the upload with")
    for rel in rels + [marker]:
        upload_file(os.path.join(local_dir, *rel.split("/")), join(url, rel))
    return url


def cache_root() -> str:
    """Where local copies of bucket objects live: `$QWEN_EDIT_JAX_CACHE`, else `~/.cache/qwen_edit_jax`."""
    return os.environ.get("QWEN_EDIT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen_edit_jax")


def local_copy(url: str, *, progress: bool = True, root: str | None = None) -> str:
    """A local copy of the `gs://` file or prefix `url` (every object under it), for readers that need a
    file system (memory-mapped safetensors). Kept under `root` (`cache_root()`)/`gcs/<bucket>/<name>`,
    each file downloaded whole and atomically; a file already there with the object's size is reused.
    Returns the local path (file or folder); a local `url` is returned as it is."""
    if not is_remote(url):
        return os.fspath(url)
    url = normalize(url)
    dest = os.path.join(root or cache_root(), "gcs", *url[len(REMOTE_PREFIX):].split("/"))
    src = as_path(url)
    if src.is_dir():
        rels = files_under(url)
        if not rels:
            raise FileNotFoundError(f"{url}: no objects under this prefix")
        items = [(join(url, r), os.path.join(dest, *r.split("/"))) for r in rels]
    elif src.exists():
        items = [(url, dest)]
    else:
        raise FileNotFoundError(f"{url}: no such object or prefix")
    sizes = [size(u) for u, _ in items]
    todo = [(u, d, n) for (u, d), n in zip(items, sizes) if not (os.path.isfile(d) and os.path.getsize(d) == n)]
    if not todo:
        return dest
    bar = None
    if progress:
        bar = tqdm(total=sum(n for *_, n in todo), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"download {url}")
    # whole files, several at a time: each is one sequential stream, the way object stores are fastest
    with concurrent.futures.ThreadPoolExecutor(min(_DOWNLOADS, len(todo)), "download") as pool:
        futures = [pool.submit(download_file, u, d, on_bytes=bar.update if bar is not None else None)
                   for u, d, _ in todo]
        try:
            for f in futures:
                f.result()
        finally:
            for f in futures:
                f.cancel()
            if bar is not None:
                bar.close()
    return dest


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder or every object under a prefix (no error when absent)."""
    p = as_path(path)
    if p.exists():
        p.rmtree()
