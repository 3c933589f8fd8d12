"""`train/cache_dataset.py`: exit codes and one-line errors, nothing written on bad input, --skip-bad with a
report file, and kill-and-resume: the command is SIGKILLed during start-up and after its first shard, then
rerun; the finished cache equals an uninterrupted run's, sample for sample and shard for shard (the kept
shards byte for byte; recomputed tensors up to XLA:CPU's run-to-run float rounding)."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from qwen_edit_jax.testing.repo import write_tiny_edit_repo
from qwen_edit_jax.caching.writer import partial_path
from qwen_edit_jax.cache_format import CachedDataset, DataError
from qwen_edit_jax.utils import storage
import gcs_emulator
from tests.background import Job
from tests.compare import assert_close
from test_caching import (EXPECTED_BAD, assert_same_cache, bad_dataset, folder_dataset, rand_image,
                          shard_hashes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train", "cache_dataset.py")
sys.path.insert(0, os.path.join(ROOT, "train"))
import cache_dataset as cli  # noqa: E402

FAST = ["--resolution", "96", "--control-resolution", "target", "--dtype", "float32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return str(write_tiny_edit_repo(tmp_path_factory.mktemp("repo") / "edit", "edit"))


def run_main(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_input_exits_2_and_writes_nothing(tmp_path, repo, capsys):
    data = bad_dataset(tmp_path / "d")
    out = tmp_path / "cache"
    rc, _, err = run_main(capsys, "--dataset", data, "--model", repo, "--output", str(out), "--no-progress",
                          "--report", str(tmp_path / "report.json"), *FAST)
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[0] == "error: 10 of 13 samples have bad input:"
    assert lines[-1] == "nothing was written; fix these files, or pass --skip-bad to cache the 3 good samples"
    body = "\n".join(lines[1:-1])
    for sid, reason in EXPECTED_BAD.items():
        assert f"{reason}" in body, sid
    assert not os.path.exists(out) and not os.path.exists(partial_path(str(out)))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bad_samples"] == 10 and {b["sample"] for b in report["bad"]} == set(EXPECTED_BAD)


def _option_cases(tmp_path, repo):
    data = folder_dataset(tmp_path / "ok", [("a", (64, 64), "x")])
    nocontrol = tmp_path / "nocontrol"
    rand_image(nocontrol / "a.png", 64, 64)
    (nocontrol / "a.txt").write_text("x")
    t2i = tmp_path / "t2i"
    shutil.copytree(repo, t2i)
    (t2i / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    afile = tmp_path / "file"
    afile.write_text("x")
    base = ["--dataset", data, "--model", repo, "--output", str(tmp_path / "out")]
    return [
        (base + ["--resolution", "8"], "--resolution 8: must be an integer >= 32"),
        (base + ["--control-resolution", "big"], "--control-resolution 'big'"),
        (base + ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (base + ["--mesh", "1,2"], "--mesh must be DATA,FSDP,TENSOR"),
        (base + ["--alpha-background", "notacolour"], "--alpha-background 'notacolour': not a colour"),
        (base + ["--dtype", "int3"], "int3"),
        (["--dataset", str(tmp_path / "missing"), *base[2:]], f"--dataset {tmp_path / 'missing'}: no such file"),
        (base[:2] + ["--model", str(tmp_path / "nomodel"), *base[4:]], "--model"),
        (base[:2] + ["--model", str(t2i), *base[4:]], "is text-to-image"),
        (base[:4] + ["--output", str(afile / "sub")], "--output"),
        (["--dataset", str(nocontrol), *base[2:]], "no control/ folder"),
    ]


def test_option_errors_are_one_line_exit_2(tmp_path, repo, capsys):
    for argv, expected in _option_cases(tmp_path, repo):
        rc, _, err = run_main(capsys, *argv, "--no-progress")
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (argv, err)
        assert not os.path.exists(tmp_path / "out") and not os.path.exists(partial_path(str(tmp_path / "out")))


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (rc {proc.returncode}) before {path} appeared: "
                                 f"{proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def _start(args) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


def reference_args(folder, repo) -> list[str]:
    """Six samples of three layouts plus one bad, written to `folder`; the command's arguments for them."""
    specs = [(f"s{i}", size, f"instruction {i}") for i, size in enumerate([(64, 64), (96, 64), (64, 96)] * 2)]
    data = folder_dataset(folder, specs)
    rand_image(os.path.join(folder, "lonely.png"), 64, 64)  # no caption, no reference: bad
    return ["--dataset", data, "--model", repo, *FAST, "--shard-mb", "0.0001", "--skip-bad"]


# The two-host run (tests/caching_two_hosts.py) on the same repo and dataset, written again in a folder of its own.
TWO_HOSTS_DIR = tempfile.mkdtemp(prefix="caching-two-hosts-")
atexit.register(shutil.rmtree, TWO_HOSTS_DIR, ignore_errors=True)
TWO_HOSTS = Job("cache_dataset.py on two hosts", [sys.executable, os.path.join(ROOT, "tests", "caching_two_hosts.py"),
                                                  TWO_HOSTS_DIR], timeout=1200)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, repo):
    """`reference_args`' dataset and its cache made in-process without interruption (--skip-bad, --report);
    returns (args, cache path, report path)."""
    tmp = tmp_path_factory.mktemp("reference")
    args = reference_args(tmp / "d", repo)
    rc = cli.main([*args, "--output", str(tmp / "reference"), "--no-progress", "--report", str(tmp / "report.json")])
    assert rc == 0
    return args, str(tmp / "reference"), str(tmp / "report.json")


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, reference):
    """SIGKILL while the encoders load, SIGKILL after the first shard, rerun: the same cache as an
    uninterrupted run. Also --skip-bad with --report, and the progress bar's samples/s."""
    args, ref, report = reference
    assert {b["sample"] for b in json.loads(open(report).read())["bad"]} == {"lonely"}
    cache = tmp_path / "cache"
    partial = partial_path(str(cache))
    proc = _start([*args, "--output", str(cache)])
    _wait_for(os.path.join(partial, "job.json"), proc)  # validated; loading the encoders
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc = _start([*args, "--output", str(cache)])
    _wait_for(os.path.join(partial, "shard-00000.json"), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not os.path.exists(cache) and os.path.exists(os.path.join(partial, "shard-00000.safetensors"))
    done = sum(len(json.load(open(os.path.join(partial, f)))["entries"]) for f in os.listdir(partial)
               if f.startswith("shard-") and f.endswith(".json"))
    assert 0 < done < 6
    kept = shard_hashes(partial)
    proc = _start([*args, "--output", str(cache)])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert f"resuming {partial}: {done} of 6 samples already cached" in stderr
    assert re.search(r"\d+\.\d+sample/s\]", stderr) and f"{done} resumed" in stdout and "1 skipped" in stdout
    assert "warning: skipping 1 of 7 samples (--skip-bad):" in stderr
    assert not os.path.exists(partial)
    assert_same_cache(CachedDataset(ref, verify=True), CachedDataset(cache, verify=True), kept)
    rerun = _start([*args, "--output", str(cache), "--no-progress"])
    stdout, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "already complete (6 samples)" in stdout


@pytest.mark.slow
@pytest.mark.background(TWO_HOSTS)
def test_two_hosts_write_the_same_cache(reference):
    """2 processes × 2 CPU devices through jax.distributed (the default FSDP mesh over all 4): every batch is
    split over both hosts, process 0 alone writes, and the cache equals the single-device one."""
    _, ref, _ = reference
    job = TWO_HOSTS.result()
    lines = [line for line in job.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"tests/caching_two_hosts.py printed no result (rc={job.returncode}):\n{job.stderr[-4000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["ok"], res.get("error")
    out = res["cache"]
    results = [(stdout, stderr) for _, stdout, stderr in res["runs"]]
    for rc, _, stderr in res["runs"]:
        assert rc == 0, stderr[-3000:]
    assert "done: 6 samples" in results[0][0] and "done" not in results[1][0]
    assert "skipping" in results[0][1] and "skipping" not in results[1][1]  # one report, from process 0
    a, b = CachedDataset(ref, verify=True), CachedDataset(out, verify=True)
    assert sorted(i.sample_id for i in a.infos) == sorted(i.sample_id for i in b.infos)
    by_id = {b.infos[i].sample_id: b[i] for i in range(len(b))}
    for i in range(len(a)):
        x, y = a[i], by_id[a.infos[i].sample_id]
        for name in ("target", "prompt_embeds", "negative_prompt_embeds"):
            # measured ≤ 1.7e-6 (2026-12-07), ≈ 10×
            assert_close(getattr(y, name), getattr(x, name), 2e-5, f"two hosts vs one: {x.sample_id} {name}")
        for r, t in zip(x.references, y.references):
            assert_close(t, r, 2e-5, f"two hosts vs one: {x.sample_id} reference latents")


def _wait_for_object(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the emulator holds the object `url` (listed by its JSON API: no client cache)."""
    t0 = time.monotonic()
    while url[len("gs://"):] not in gcs_emulator.objects(url):
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (rc {proc.returncode}) before {url} appeared: "
                                 f"{proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{url} did not appear within {timeout} s")
        time.sleep(0.01)


def _download(url: str, folder) -> str:
    """Every object under `url` into `folder` (listed by the emulator: gcsfs caches listings per process, and
    another process wrote these)."""
    skip = len(url.split("/", 3)[3]) + 1  # the prefix and its slash
    for name in gcs_emulator.objects(url + "/"):
        storage.download_file(f"gs://{name}", os.path.join(folder, name.split("/", 1)[1][skip:]))
    return str(folder)


@pytest.mark.slow
def test_cache_to_a_bucket_resumes_and_equals_the_local_run(tmp_path, reference, gcs_dir):
    """--output gs://…: SIGKILL after the first shard is uploaded (a prefix without manifest.json, which a reader
    refuses), rerun: the cache in the bucket equals the local uninterrupted run, the kept shard unchanged."""
    args, ref, _ = reference
    cache = f"{gcs_dir}/cache"
    partial = partial_path(cache)
    proc = _start([*args, "--output", cache, "--no-progress"])
    _wait_for_object(f"{partial}/shard-00000.json", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    names = {n.split("/", 1)[1] for n in gcs_emulator.objects(gcs_dir)}
    rel = cache.split("/", 3)[3]
    assert f"{rel}/shard-00000.safetensors" in names and f"{rel}/manifest.json" not in names
    with pytest.raises(DataError, match=r"manifest.json: missing; .* is not a complete cached dataset"):
        CachedDataset(_download(cache, tmp_path / "killed"))
    kept = {json.loads(storage.read_text(f"gs://{n}"))["shard"]["file"]: json.loads(storage.read_text(f"gs://{n}"))
            ["shard"]["sha256"] for n in gcs_emulator.objects(partial + "/") if n.endswith(".json") and "/shard-" in n}
    assert kept and len(kept) < 4
    proc = _start([*args, "--output", cache, "--no-progress"])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert f"resuming {partial}: " in stderr and "resumed" in stdout
    assert gcs_emulator.objects(partial + "/") == []  # the records are gone once the manifest commits the cache
    local = _download(cache, tmp_path / "done")
    assert sorted(os.listdir(local)) == sorted(os.listdir(ref))
    manifests = [json.loads(open(os.path.join(c, "manifest.json")).read()) for c in (ref, local)]
    entries = [[{k: v for k, v in e.items() if k != "crc32"} for e in m["samples"]] for m in manifests]
    assert entries[0] == entries[1]  # ids, shards, keys, shapes (crc32: the tensors up to float rounding, below)
    assert_same_cache(CachedDataset(ref, verify=True), CachedDataset(local, verify=True), kept)
    rerun = _start([*args, "--output", cache, "--no-progress"])
    stdout, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "already complete (6 samples)" in stdout
