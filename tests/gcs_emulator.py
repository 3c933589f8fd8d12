"""A Cloud Storage emulator on localhost for the `gs://` tests (the `gcp-storage-emulator` package).

`start()` runs the emulator in a thread of the test process and points the clients at it through
their standard variables — `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage, hence epath and
Orbax), `TENSORSTORE_GCS_HTTP_URL` + `GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore) — which
subprocesses inherit. `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` stops gcsfs asking the emulator
(which has no gRPC API) for the bucket's type, a 60 s timeout per bucket otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator

from gcp_storage_emulator.handlers import objects as _objects
from gcp_storage_emulator.server import create_server

BUCKET = "bkt"
_download = _objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    """The emulator's media download plus the `x-goog-generation` header Cloud Storage sends with it.

    tensorstore's OCDBT driver (Orbax checkpoints) reads the generation of `manifest.ocdbt` from that header to
    update it conditionally; without it, a save whose manifest is written twice failed now and then with
    "Malformed StorageGeneration" (1 of 8 saves here; 0 of 16 with the header)."""
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the original handler answered 404
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


_objects.download = _download_with_generation  # `objects.get` (`?alt=media`, tensorstore's reads) calls it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start(bucket: str = BUCKET) -> Iterator[str]:
    """Run an in-memory emulator with one empty bucket; yields `gs://<bucket>`; restores the environment."""
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # "Resource not found" on probes
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{bucket}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def objects(url: str) -> list[str]:
    """Every object name under the `gs://` prefix `url`, listed by the emulator's JSON API (no client cache)."""
    bucket, _, prefix = url[len("gs://"):].partition("/")
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o?{query}") as r:
        return sorted(f"{bucket}/{item['name']}" for item in json.load(r).get("items", []))
