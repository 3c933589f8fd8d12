"""Base weights and conversions in a bucket (the Cloud Storage emulator): a merged checkpoint written to
gs:// equals the local one and loads from there with the same params; a prefix without its marker is
refused in one line; safetensors in a bucket load through a local copy; LoRA files upload whole."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import qwen_edit_jax as q
from gcs_emulator import objects
from qwen_edit_jax.convert import convert
from qwen_edit_jax.errors import CheckpointError
from qwen_edit_jax.utils import storage
from qwen_edit_jax.weights import checkpoint
from qwen_edit_jax.testing.random_weights import write_random_transformer
from tests.test_convert import TINY, _lora_sd, flax_params, tensors_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli():
    spec = importlib.util.spec_from_file_location("cc", os.path.join(ROOT, "convert", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def _errors(err: str) -> list[str]:
    """The command's error lines (the emulator's thread logs a BrokenPipe traceback when a client hangs up early)."""
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _names(url: str) -> list[str]:
    """Object names under `url`, relative to it (the emulator's listing)."""
    rel = len(url.split("/", 3)[3]) + 1
    return sorted(n.split("/", 1)[1][rel:] for n in objects(url + "/"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny diffusers folder (random weights, no torch) and its local merged conversion."""
    tmp = tmp_path_factory.mktemp("gcs-base")
    folder = write_random_transformer(tmp / "base", TINY, seed=4)
    convert(folder, tmp / "merged", "to_merged", progress=False)
    return str(folder), str(tmp / "merged")


def test_merged_checkpoint_in_a_bucket(base, gcs_dir, capsys):
    """convert_checkpoint.py --output gs://: the same leaves as the local conversion, the marker written (and
    present), load_transformer from gs:// the same params; an existing prefix refused, --overwrite replaces it."""
    folder, local = base
    url = f"{gcs_dir}/merged"
    cli = _cli()
    args = ["--input", folder, "--output", url, "--direction", "to_merged", "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    local_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(local) for f in fs) / 1e6
    assert f"wrote merged Orbax checkpoint (config.json + params/): {url} (77 tensors, {local_mb:.1f} MB" in out
    names = _names(url)
    assert {checkpoint.MARKER, "config.json"} <= set(names) and any(n.startswith("params/") for n in names)
    assert checkpoint.is_merged_checkpoint(url)
    assert storage.read_text(f"{url}/config.json") == open(os.path.join(local, "config.json")).read()
    a, b = checkpoint.MergedParams(local), checkpoint.MergedParams(url)
    assert a.paths() == b.paths()
    for p in a.paths():
        x, y = a.read(p), b.read(p)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), p
    ours = flax_params(q.load_transformer(url, progress=False))
    ref = flax_params(q.load_transformer(local, progress=False))
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    assert cli.main(args) == 2
    (err,) = _errors(capsys.readouterr().err)
    assert err.startswith(f"error: {url} already exists; pass --overwrite")
    assert cli.main([*args, "--overwrite", "--dtype", "bf16"]) == 0
    assert checkpoint.MergedParams(url).dtype("img_in.kernel") == np.dtype("bfloat16")


def test_prefix_without_its_marker_is_refused(base, gcs_dir, tmp_path):
    """What a killed upload leaves (everything but the marker) is no checkpoint: one line naming the marker."""
    _, local = base
    url = f"{gcs_dir}/partial"
    storage.upload_tree(local, url, marker=checkpoint.MARKER)
    storage.as_path(f"{url}/{checkpoint.MARKER}").unlink()
    assert not checkpoint.is_merged_checkpoint(url)
    with pytest.raises(CheckpointError) as e:
        q.load_transformer(url, progress=False)
    msg = str(e.value)
    assert msg == f"{url}/{checkpoint.MARKER}: missing; {url} is not a complete merged checkpoint (its marker is " \
                  f"written last)"


def test_safetensors_in_a_bucket_load_from_a_local_copy(base, gcs_dir, tmp_path, monkeypatch):
    """A diffusers folder in a bucket: downloaded once into $QWEN_EDIT_JAX_CACHE, reused when the sizes match."""
    folder, _ = base
    monkeypatch.setenv("QWEN_EDIT_JAX_CACHE", str(tmp_path / "cache"))
    url = f"{gcs_dir}/diffusers"
    for name in sorted(os.listdir(folder)):
        storage.upload_file(os.path.join(folder, name), f"{url}/{name}")
    ours = flax_params(q.load_transformer(url, progress=False))
    ref = flax_params(q.load_transformer(folder, progress=False))
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    copy = os.path.join(tmp_path, "cache", "gcs", *url[len("gs://"):].split("/"))
    assert sorted(os.listdir(copy)) == sorted(os.listdir(folder))
    stamps = {n: os.stat(os.path.join(copy, n)).st_mtime_ns for n in os.listdir(copy)}
    q.load_transformer(url, progress=False)
    assert stamps == {n: os.stat(os.path.join(copy, n)).st_mtime_ns for n in os.listdir(copy)}  # reused
    storage.write_text(f"{url}/config.json", open(os.path.join(folder, "config.json")).read() + "\n")
    assert storage.local_copy(url, progress=False) == copy  # a size differs: that file is fetched again
    assert open(os.path.join(copy, "config.json")).read().endswith("}\n\n")
    assert [n for n in stamps if os.stat(os.path.join(copy, n)).st_mtime_ns != stamps[n]] == ["config.json"]


def test_lora_to_a_bucket_and_standard_base_refused(base, gcs_dir, tmp_path, capsys):
    """A LoRA converts to gs:// (written locally, uploaded whole: the same bytes as locally); a diffusers folder
    to gs:// is refused in one line before anything is written."""
    from safetensors.numpy import save_file

    folder, _ = base
    src = tmp_path / "lora.safetensors"
    save_file(_lora_sd("diffsynth"), str(src))
    convert(str(src), str(tmp_path / "merged.safetensors"), "to_merged")
    convert(str(src), f"{gcs_dir}/lora/merged.safetensors", "to_merged")
    got = tmp_path / "back.safetensors"
    storage.download_file(f"{gcs_dir}/lora/merged.safetensors", got)
    assert got.read_bytes() == (tmp_path / "merged.safetensors").read_bytes()
    assert sorted(tensors_of(str(got))) == sorted(tensors_of(str(tmp_path / "merged.safetensors")))
    assert _cli().main(["--input", folder, "--output", f"{gcs_dir}/std", "--direction", "to_standard",
                        "--no-progress"]) == 2
    (err,) = _errors(capsys.readouterr().err)
    assert "a bucket takes merged checkpoints (--direction to_merged) and LoRA files" in err
    assert objects(f"{gcs_dir}/std") == []
