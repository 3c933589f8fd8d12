"""utils.storage: one API for local paths and gs:// (against the Cloud Storage emulator)."""

from __future__ import annotations

import os

import pytest

from gcs_emulator import objects
from qwen_edit_jax.utils import storage


def test_scheme_and_join(tmp_path):
    assert storage.is_remote("gs://b/x") and not storage.is_remote(tmp_path)
    assert storage.join("gs://b/x/", "y", "z.json") == "gs://b/x/y/z.json"
    assert storage.join(str(tmp_path), "y") == os.path.join(tmp_path, "y")
    with pytest.raises(ValueError, match=r"--output s3://b/x: only local paths and gs://"):
        storage.check_scheme("s3://b/x", "--output")
    storage.check_scheme("gs://b/x", "--output")


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_files_round_trip(where, tmp_path, request):
    base = request.getfixturevalue("gcs_dir") if where == "gcs" else str(tmp_path / "out")
    f = storage.join(base, "a", "b.json")
    storage.write_text(f, "one")
    assert storage.read_text(f) == "one" and storage.exists(f) and storage.isdir(storage.join(base, "a"))
    with pytest.raises(FileExistsError, match="b.json already exists"):
        storage.write_text(f, "two", overwrite=False)
    assert storage.read_text(f) == "one"
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 << 20))
    up = storage.upload_file(src, storage.join(base, "big.bin"))
    assert storage.read_bytes(up) == src.read_bytes()
    assert storage.read_bytes(storage.download_file(up, tmp_path / "back.bin")) == src.read_bytes()
    assert storage.listdir(base) == ["a", "big.bin"]
    storage.remove_tree(base)
    assert not storage.exists(f) and storage.listdir(base) == []


def test_upload_tree_commits_last(tmp_path, gcs_dir):
    src = tmp_path / "tree"
    (src / "params").mkdir(parents=True)
    (src / "params" / "x.bin").write_bytes(b"x")
    (src / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no DONE to commit"):
        storage.upload_tree(src, gcs_dir, marker="DONE")
    (src / "DONE").write_text("")
    storage.upload_tree(src, gcs_dir, marker="DONE")
    names = [n.split("/", 2)[2] for n in objects(gcs_dir)]
    assert sorted(names) == ["DONE", "config.json", "params/x.bin"]
    assert storage.read_bytes(storage.join(gcs_dir, "params", "x.bin")) == b"x"
