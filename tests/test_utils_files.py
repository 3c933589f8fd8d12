"""The one atomic-write helper: a complete output or none, an existing one replaced only when asked."""

from __future__ import annotations

import os

import pytest

from qwen_edit_jax.utils.files import atomic_path, move_into_place


def test_atomic_file_is_complete_or_absent(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_path(target) as tmp, open(tmp, "w") as f:
        f.write("one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_path(target, overwrite=True) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "one" and os.listdir(target.parent) == ["out.json"]
    with pytest.raises(FileExistsError, match="--overwrite"), atomic_path(target):
        pass
    with atomic_path(target, overwrite=True) as tmp, open(tmp, "w") as f:
        f.write("two")
    assert target.read_text() == "two" and os.listdir(target.parent) == ["out.json"]


def test_move_into_place_replaces_a_folder_only_when_asked(tmp_path):
    old, new = tmp_path / "out", tmp_path / "out.partial"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    with pytest.raises(FileExistsError):
        move_into_place(new, old)
    assert move_into_place(new, old, overwrite=True) == str(old)
    assert os.listdir(old) == ["b"] and sorted(os.listdir(tmp_path)) == ["out"]
