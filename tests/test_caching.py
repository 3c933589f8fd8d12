"""Dataset → cache (`qwen_edit_jax.caching`): layouts, per-file validation, bucketing, and end to end on a tiny
random repo: the cache holds exactly what the components produce directly (VAE encode of the resized images,
`encode_prompt` with the references), resumes after an interruption with identical tensors, and trains.

The tiny repo (`testing/repo.py`) is written with numpy only; the encoders are loaded once per module and
shared by every end-to-end test, so each image size compiles once.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from qwen_edit_jax import caching
from qwen_edit_jax.caching import buckets, layouts, validate
from qwen_edit_jax.caching.buckets import Sizing
from qwen_edit_jax.caching.run import CacheOptions, Encoders, cache_dataset, plan_batches
from qwen_edit_jax.caching.writer import partial_path
from qwen_edit_jax.cache_format import CachedDataset
from qwen_edit_jax.imaging import calculate_dimensions, plan_sizes, resize, vae_pixels
from qwen_edit_jax.testing.latent import LatentDemo, make_demo_checkpoint
from qwen_edit_jax.testing.repo import write_tiny_edit_repo
from qwen_edit_jax.training.config import config_from_dict
from qwen_edit_jax.training.data import BatchLoader
from qwen_edit_jax.training.loop import train
from tests.compare import assert_close
from tests.vae_reference import torch_encode

# ≈ 10× the error measured on 2026-12-07 (2-core CPU; tests/compare.py says how to re-measure)
LATENT_TOL = 3e-5  # cached latents vs diffusers' VAE on the same resized images: measured ≤ 2.1e-6
EMBED_TOL = 8e-6  # cached (batched, padded) prompt embeds vs one prompt alone: measured ≤ 7.0e-7
RESUME_TOL = 1e-6  # resumed vs uninterrupted: measured 0 (bitwise), a float-rounding bar (see assert_same_cache)


# ---- file helpers ----------------------------------------------------------------------------------
def rand_image(path, w: int, h: int, seed: int = 0, mode: str = "RGB", fmt: str | None = None) -> str:
    """A smooth random image (so resizing matters) saved at `path`."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    img = img.convert(mode) if mode != "RGB" else img
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img.save(str(path), format=fmt)
    return str(path)


def png_bytes(arr: np.ndarray, color_type: int, depth: int) -> bytes:
    """A PNG written by hand (PIL cannot write 16 bits per channel RGB)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def folder_dataset(root, specs, *, controls: int = 1, numbered: bool = False) -> str:
    """specs: (stem, (w, h), caption) → target + caption + `controls` references (control/ or control_k/)."""
    os.makedirs(root, exist_ok=True)
    for i, (stem, (w, h), caption) in enumerate(specs):
        rand_image(os.path.join(root, f"{stem}.png"), w, h, seed=i)
        with open(os.path.join(root, f"{stem}.txt"), "w") as f:
            f.write(caption + "\n")
        for k in range(controls):
            if controls == 1:
                path = os.path.join(root, "control", f"{stem}.jpg")
            elif numbered:
                path = os.path.join(root, "control", f"{stem}_{k}.png")
            else:
                path = os.path.join(root, f"control_{k}", f"{stem}.png")
            rand_image(path, w + 16 * k, h, seed=100 + 10 * i + k)
    return str(root)


# ---- buckets ---------------------------------------------------------------------------------------
def test_target_buckets_keep_area_and_never_upscale():
    s = Sizing(resolution=1024)
    assert buckets.target_size(2048, 1536, s) == calculate_dimensions(1024**2, 2048 / 1536) == (1184, 896)
    assert buckets.target_size(4000, 4000, s) == (1024, 1024)
    small = buckets.target_size(700, 500, s)  # less area than 1024²: sides rounded down, never enlarged
    assert small == (672, 480)
    assert buckets.target_size(700, 500, Sizing(1024, upscale=True)) == calculate_dimensions(1024**2, 1.4)
    for w, h in [(1000, 1000), (3000, 1000), (640, 1920), (1025, 1023)]:
        tw, th = buckets.target_size(w, h, s)
        assert tw % 32 == 0 and th % 32 == 0
        assert tw * th <= max(w * h, 1.1 * 1024**2)
    with pytest.raises(buckets.SizeError, match="at least 32 px.*--upscale"):
        buckets.target_size(20, 300, s)
    with pytest.raises(buckets.SizeError, match="too extreme"):
        buckets.target_size(100000, 50, Sizing(64))


def test_reference_sizes_are_the_pipelines():
    s = Sizing(resolution=512)
    img = Image.new("RGB", (900, 600))
    for variant in ("edit", "edit_plus"):  # both pipelines encode references at 1024² area
        assert buckets.reference_vae_size(900, 600, (512, 352), s) == plan_sizes([img], variant).vae[0]
    assert buckets.reference_vae_size(900, 600, (512, 352), Sizing(512, control_resolution="target")) == (512, 352)
    assert buckets.reference_vae_size(900, 600, (0, 0), Sizing(512, control_resolution=256)) == \
        calculate_dimensions(256**2, 1.5)
    size = plan_sizes([img], "edit_plus").vae[0]
    want = (2.0 * (np.asarray(resize(img, *size), np.float32) / 255.0) - 1.0).transpose(2, 0, 1)
    np.testing.assert_array_equal(vae_pixels(img, size), want)


@pytest.mark.parametrize("bad", [dict(resolution=16), dict(control_resolution="huge"), dict(control_resolution=8)])
def test_sizing_errors_name_the_option(bad):
    with pytest.raises(ValueError, match="--(control-)?resolution"):
        Sizing(**bad)


# ---- layouts ---------------------------------------------------------------------------------------
def test_folder_layout_single_control(tmp_path):
    root = folder_dataset(tmp_path / "d", [("a", (64, 64), "red"), ("b", (96, 64), "blue")])
    (tmp_path / "d" / "notes.md").write_text("x")
    listing = layouts.read_dataset(root)
    assert listing.kind == "folder" and not listing.problems
    assert [(s.sample_id, os.path.basename(s.target), [os.path.relpath(c, root) for c in s.controls])
            for s in listing.samples] == [("a", "a.png", ["control/a.jpg"]), ("b", "b.png", ["control/b.jpg"])]
    assert any("notes.md" in n for n in listing.notes)


@pytest.mark.parametrize("numbered", [False, True])
def test_folder_layout_several_controls(tmp_path, numbered):
    """control_0/, control_1/ (ai-toolkit) or control/stem_0, stem_1 (musubi), ordered by the number."""
    specs = [("a", (64, 64), "x"), ("b", (64, 64), "y")] + [("c_1", (64, 64), "z")] * numbered
    root = folder_dataset(tmp_path / "d", specs[:2], controls=2, numbered=numbered)
    if numbered:  # c_1.png is the exact reference of target c_1, not a numbered one of a missing target c
        folder_dataset(tmp_path / "d", specs[2:])
        for k in (10, 2):
            rand_image(tmp_path / "d" / "control" / f"b_{k}.png", 64, 64)
    listing = layouts.read_dataset(root)
    assert not listing.problems, listing.problems
    got = {s.sample_id: [os.path.relpath(c, root) for c in s.controls] for s in listing.samples}
    if numbered:
        assert got == {"a": ["control/a_0.png", "control/a_1.png"], "c_1": ["control/c_1.jpg"],
                       "b": ["control/b_0.png", "control/b_1.png", "control/b_2.png", "control/b_10.png"]}
    else:
        assert got == {"a": ["control_0/a.png", "control_1/a.png"], "b": ["control_0/b.png", "control_1/b.png"]}


def test_folder_layout_problems(tmp_path):
    root = folder_dataset(tmp_path / "d", [("a", (64, 64), "x"), ("b", (64, 64), "y"), ("c", (64, 64), "z")],
                          controls=2)
    rand_image(tmp_path / "d" / "a.jpg", 64, 64)  # duplicate stem
    os.remove(tmp_path / "d" / "control_1" / "b.png")  # missing reference
    os.remove(tmp_path / "d" / "c.txt")  # missing caption
    listing = layouts.read_dataset(root)
    assert [s.sample_id for s in listing.samples] == []
    reasons = {(p.sample_id, p.reason.split(" ")[0] + " " + p.reason.split(" ")[1]) for p in listing.problems}
    assert reasons == {("a", "duplicate stem"), ("b", "missing reference"), ("c", "missing caption")}
    allowed = layouts.read_dataset(root, allow_no_reference=True)  # b lacks one of its two: still bad
    assert [s.sample_id for s in allowed.samples] == [] and len(allowed.problems) == len(listing.problems)
    os.remove(tmp_path / "d" / "control_0" / "b.png")  # b has no reference at all: a text-to-image pair
    assert [(s.sample_id, s.controls) for s in layouts.read_dataset(root, allow_no_reference=True).samples] == \
        [("b", ())]
    with pytest.raises(layouts.LayoutError, match="both control/ and numbered"):
        os.makedirs(tmp_path / "d" / "control")
        layouts.read_dataset(root)
    with pytest.raises(layouts.LayoutError, match="no images found"):
        os.makedirs(tmp_path / "empty")
        layouts.read_dataset(tmp_path / "empty")


def _metadata_dataset(tmp_path, fmt: str, rows) -> str:
    root = tmp_path / "m"
    for name, (w, h) in [("t1.png", (64, 64)), ("t2.png", (96, 64)), ("e1.png", (64, 64)), ("e2.png", (80, 64)),
                         ("e3.png", (64, 80))]:
        rand_image(root / "imgs" / name, w, h, seed=len(name) + w)
    path = root / f"metadata.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(rows) + "\n")
    return str(root)


def test_metadata_layouts(tmp_path):
    diffsynth = [{"image": "imgs/t1.png", "edit_image": ["imgs/e1.png", "imgs/e2.png"], "prompt": "two refs"},
                 {"image": "imgs/t2.png", "edit_image": "imgs/e3.png", "prompt": "one ref"}]
    listing = layouts.read_dataset(_metadata_dataset(tmp_path / "a", "json", diffsynth))
    assert listing.kind == "metadata" and not listing.problems
    assert [(s.sample_id, [os.path.basename(c) for c in s.controls], s.prompt) for s in listing.samples] == \
        [("imgs/t1", ["e1.png", "e2.png"], "two refs"), ("imgs/t2", ["e3.png"], "one ref")]
    csv_rows = ["image,edit_image,prompt", 'imgs/t1.png,imgs/e1.png,"make it red, please"',
                "imgs/t2.png,imgs/e2.png,x"]
    listing = layouts.read_dataset(_metadata_dataset(tmp_path / "b", "csv", csv_rows))
    assert [s.prompt for s in listing.samples] == ["make it red, please", "x"] and not listing.problems
    musubi = [{"image_path": "imgs/t1.png", "control_path_1": "imgs/e2.png", "control_path_0": "imgs/e1.png",
               "caption": "c"}]
    root = _metadata_dataset(tmp_path / "c", "jsonl", musubi)
    listing = layouts.read_dataset(os.path.join(root, "metadata.jsonl"))  # the file itself as --dataset
    assert [os.path.basename(c) for c in listing.samples[0].controls] == ["e1.png", "e2.png"]


def test_metadata_row_problems(tmp_path):
    rows = ['{"image": "imgs/t1.png", "edit_image": "imgs/e1.png", "prompt": "ok"}',
            '{"image": "imgs/t2.png", "edit_image": "imgs/e2.png", prompt: 3}',
            json.dumps({"edit_image": "imgs/e1.png", "prompt": "no target"}),
            json.dumps({"image": "imgs/nope.png", "edit_image": "imgs/e1.png", "prompt": "missing file"}),
            json.dumps({"image": "imgs/t2.png", "edit_image": "imgs/e1.png", "control_path": "imgs/e2.png",
                        "prompt": "two kinds"}),
            json.dumps({"image": "imgs/t1.png", "edit_image": "imgs/e3.png", "prompt": "duplicate"}),
            json.dumps([1, 2])]
    listing = layouts.read_dataset(_metadata_dataset(tmp_path, "jsonl", rows))
    assert listing.samples == []
    by_line = {p.where.rsplit(" ", 1)[1]: p.reason for p in listing.problems}
    assert by_line["2"].startswith("not valid JSON")
    assert by_line["3"].startswith("no target image")
    assert by_line["4"].startswith("missing image imgs/nope.png")
    assert "several reference keys" in by_line["5"]
    assert by_line["1"].startswith("duplicate target") and "line 6" in by_line["1"]
    assert by_line["6"].startswith("duplicate target")
    assert "expected an object" in by_line["7"]
    csv_rows = ["image,edit_image,prompt", "imgs/t1.png,imgs/e1.png", "imgs/t2.png,imgs/e2.png,fine"]
    listing = layouts.read_dataset(_metadata_dataset(tmp_path / "csv", "csv", csv_rows))
    assert [p.reason for p in listing.problems] == ["has 2 fields, the header has 3"]
    assert len(listing.samples) == 1


# ---- validation ------------------------------------------------------------------------------------
def _bad_files(d):
    """Every kind of file validation must judge: {name: path}."""
    os.makedirs(d, exist_ok=True)
    f = {}
    f["rgb"] = rand_image(os.path.join(d, "rgb.png"), 64, 64)
    f["grey"] = rand_image(os.path.join(d, "grey.png"), 64, 64, mode="L")
    f["palette"] = rand_image(os.path.join(d, "palette.png"), 64, 64, mode="P")
    f["cmyk"] = rand_image(os.path.join(d, "cmyk.jpg"), 64, 64, mode="CMYK")
    opaque = Image.open(f["rgb"]).convert("RGBA")
    opaque.save(os.path.join(d, "opaque.png"))
    f["opaque"] = os.path.join(d, "opaque.png")
    a = np.asarray(opaque).copy()
    a[:16, :, 3] = 0  # a quarter transparent
    Image.fromarray(a, "RGBA").save(os.path.join(d, "alpha.png"))
    f["alpha"] = os.path.join(d, "alpha.png")
    g16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(g16).save(os.path.join(d, "grey16.png"))
    f["grey16"] = os.path.join(d, "grey16.png")
    with open(os.path.join(d, "rgb16.png"), "wb") as fh:
        fh.write(png_bytes((np.random.default_rng(0).integers(0, 65536, (64, 64, 3))).astype(np.uint16), 2, 16))
    f["rgb16"] = os.path.join(d, "rgb16.png")
    Image.fromarray(np.zeros((8, 8), np.float32), "F").save(os.path.join(d, "float.tif"))
    f["float"] = os.path.join(d, "float.tif")
    with open(os.path.join(d, "corrupt.png"), "wb") as fh:
        fh.write(os.urandom(300))
    f["corrupt"] = os.path.join(d, "corrupt.png")
    buf = io.BytesIO()
    Image.open(f["rgb"]).save(buf, "JPEG", quality=95)
    with open(os.path.join(d, "truncated.jpg"), "wb") as fh:
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f["truncated"] = os.path.join(d, "truncated.jpg")
    open(os.path.join(d, "empty.png"), "wb").close()
    f["empty"] = os.path.join(d, "empty.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    Image.open(rand_image(os.path.join(d, "tmp.jpg"), 96, 64)).save(os.path.join(d, "rotated.jpg"), exif=exif)
    f["rotated"] = os.path.join(d, "rotated.jpg")
    return f


def test_image_rules(tmp_path):
    f = _bad_files(tmp_path)
    ok = {k: validate.load_image(f[k]) for k in ("rgb", "grey", "palette", "opaque", "grey16", "rgb16", "rotated")}
    for k, (img, _) in ok.items():
        assert img.mode == "RGB", k
    notes = {k: "; ".join(n) for k, (_, n) in ok.items()}
    assert notes["rgb"] == notes["palette"] == notes["opaque"] == ""
    assert notes["grey"] == "greyscale, converted to RGB"
    assert notes["grey16"].startswith("16-bit greyscale, reduced to 8 bits")
    assert notes["rgb16"] == "16 bits per channel, reduced to 8"
    assert notes["rotated"] == "rotated by its EXIF orientation" and ok["rotated"][0].size == (64, 96)
    g16 = np.asarray(Image.open(f["grey16"])).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(ok["grey16"][0])[..., 0], np.rint(g16 / 257).astype(np.uint8))
    reasons = {}
    for k in ("cmyk", "alpha", "float", "corrupt", "truncated", "empty"):
        with pytest.raises(validate.BadImage) as e:
            validate.load_image(f[k])
        reasons[k] = str(e.value)
    assert reasons["cmyk"].startswith("CMYK colour space")
    assert reasons["alpha"].startswith("has transparent pixels (25.0% of the image)") and \
        "--alpha-background" in reasons["alpha"]
    assert reasons["float"].startswith("floating-point pixels")
    assert reasons["corrupt"].startswith("not an image PIL can read")
    assert reasons["truncated"].startswith("truncated image data")
    assert reasons["empty"] == "empty file"
    img, notes = validate.load_image(f["alpha"], (255, 255, 255))
    assert notes == ("25.0% transparent pixels composited over white",)
    assert np.asarray(img)[:16].min() == 255 and np.array_equal(np.asarray(img)[16:], np.asarray(
        Image.open(f["rgb"]))[16:])


def test_captions(tmp_path):
    (tmp_path / "ok.txt").write_bytes("\ufeff  make it snow \n".encode())
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert validate.read_caption(str(tmp_path / "ok.txt")) == "make it snow"
    with pytest.raises(ValueError, match="is empty .*--allow-empty-prompt"):
        validate.read_caption(str(tmp_path / "empty.txt"))
    assert validate.read_caption(str(tmp_path / "empty.txt"), allow_empty=True) == ""
    with pytest.raises(ValueError, match="not UTF-8"):
        validate.read_caption(str(tmp_path / "latin1.txt"))


def bad_dataset(root) -> str:
    """A folder dataset: 3 good samples and one of every bad case (ids say which)."""
    specs = [("good1", (64, 64), "a"), ("good2", (96, 64), "b"), ("good3", (64, 64), "c"),
             ("corrupt", (64, 64), "d"), ("truncated", (64, 64), "e"), ("cmyk", (64, 64), "f"),
             ("rgba", (64, 64), "g"), ("nocaption", (64, 64), "h"), ("emptycaption", (64, 64), "i"),
             ("nocontrol", (64, 64), "j"), ("badcontrol", (64, 64), "k"), ("dup", (64, 64), "l"),
             ("small", (64, 64), "m")]
    folder_dataset(root, specs)
    f = _bad_files(os.path.join(os.path.dirname(root), "files"))
    shutil.copy(f["corrupt"], os.path.join(root, "corrupt.png"))
    shutil.copy(f["truncated"], os.path.join(root, "truncated.png"))  # a JPEG named .png: PIL reads content
    shutil.copy(f["cmyk"], os.path.join(root, "cmyk.png"))
    shutil.copy(f["alpha"], os.path.join(root, "rgba.png"))
    os.remove(os.path.join(root, "nocaption.txt"))
    with open(os.path.join(root, "emptycaption.txt"), "w") as fh:
        fh.write("\n")
    os.remove(os.path.join(root, "control", "nocontrol.jpg"))
    shutil.copy(f["corrupt"], os.path.join(root, "control", "badcontrol.jpg"))
    rand_image(os.path.join(root, "dup.jpg"), 64, 64)
    rand_image(os.path.join(root, "small.png"), 20, 40)
    return str(root)


EXPECTED_BAD = {"corrupt": "not an image PIL can read", "truncated": "truncated image data",
                "cmyk": "CMYK colour space", "rgba": "has transparent pixels", "nocaption": "missing caption",
                "emptycaption": "caption", "nocontrol": "missing reference image", "badcontrol": "not an image",
                "dup": "duplicate stem", "small": "image of 20×40 px gives a 0×32 bucket"}


def test_validate_reports_every_bad_case(tmp_path):
    root = bad_dataset(tmp_path / "d")
    listing = layouts.read_dataset(root)
    report = validate.validate(listing, "edit", Sizing(64, control_resolution=64))
    assert sorted(g.sample_id for g in report.good) == ["good1", "good2", "good3"]
    got = {}
    for p in report.bad:
        got.setdefault(p.sample_id, []).append(p.reason)
    assert sorted(got) == sorted(EXPECTED_BAD)
    for sid, start in EXPECTED_BAD.items():
        assert any(r.startswith(start) for r in got[sid]), (sid, got[sid])
    assert report.total == 13 and report.bad_samples == 10
    lines = validate.format_report(report)
    assert len(lines) == 11  # dup has two files
    assert any(line.startswith(f"  {os.path.join(root, 'cmyk.png')}: CMYK") for line in lines)
    plus = validate.validate(layouts.read_dataset(folder_dataset(tmp_path / "p", [("x", (64, 64), "y")],
                                                                 controls=2)), "edit", Sizing(64))
    assert [p.reason.split(",")[0] for p in plus.bad] == ["2 reference images"]


def test_masks_are_listed_by_stem_or_field_and_checked(tmp_path):
    """mask/ by stem (folder) and `mask` (metadata) are read; a mask of another size than its target, or an
    unreadable one, makes the sample bad with the reason; a mask without a target is a note."""
    root = folder_dataset(tmp_path / "d", [("a", (64, 64), "x"), ("b", (64, 64), "y"), ("c", (64, 64), "z")])
    rand_image(tmp_path / "d" / "mask" / "a.png", 64, 64, mode="L")
    rand_image(tmp_path / "d" / "mask" / "b.png", 32, 64, mode="L")
    rand_image(tmp_path / "d" / "mask" / "zzz.png", 64, 64, mode="L")
    listing = layouts.read_dataset(root)
    assert [(s.sample_id, s.mask and os.path.basename(s.mask)) for s in listing.samples] == \
        [("a", "a.png"), ("b", "b.png"), ("c", None)]
    assert any("zzz" in n for n in listing.notes) and not any("mask/" in n for n in listing.notes)
    report = validate.validate(listing, "edit", Sizing(64))
    assert [(g.sample_id, g.mask is not None) for g in report.good] == [("a", True), ("c", False)]
    assert [(p.sample_id, p.reason) for p in report.bad] == [
        ("b", f"mask is 32×64 px, its target {os.path.join(root, 'b.png')} is 64×64: a mask must have its "
              f"target's size")]
    rows = [{"image": "imgs/t1.png", "edit_image": "imgs/e1.png", "prompt": "p", "mask_path": "imgs/nope.png"}]
    listing = layouts.read_dataset(_metadata_dataset(tmp_path / "m", "json", rows))
    assert not listing.samples and "missing image imgs/nope.png" in listing.problems[0].reason


def test_several_resolutions_list_each_sample_per_resolution(tmp_path):
    """--resolution 32,64: every sample once per resolution (`<id>@<resolution>`) at that resolution's bucket,
    except a copy whose sizes repeat a smaller resolution's (an image too small to grow), noted; the job
    records every copy; the command line parses the list."""
    import train.cache_dataset as cli

    root = folder_dataset(tmp_path / "d", [("a", (96, 64), "x"), ("b", (40, 40), "y")])
    opts = CacheOptions(resolution=(32, 64), control_resolution="target")
    listing = layouts.read_dataset(root)
    report = validate.validate(listing, "edit", opts.sizings)
    got = [(g.sample_id, g.target_size) for g in report.good]
    want = [(f"a@{r}", buckets.target_size(96, 64, Sizing(r))) for r in (32, 64)] + [("b@32", (32, 32))]
    assert got == want and want[0][1] != want[1][1] and report.bad_samples == 0
    assert any("not cached twice" in n for n in report.notes)
    job = caching.run.make_job(caching.run.order_samples(report.good), listing, str(tmp_path), "edit", opts)
    assert sorted(row[0] for row in job["samples"]) == ["a@32", "a@64", "b@32"]
    assert job["options"]["resolution"] == [32, 64]
    assert cli.build_parser().parse_args(["--dataset", "d", "--model", "m", "--output", "o", "--resolution",
                                          "512,768,1024"]).resolution == (512, 768, 1024)
    with pytest.raises(ValueError, match="distinct"):
        CacheOptions(resolution=(64, 64))


# ---- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Two tiny repos with the same weights: Edit and Edit-Plus (only model_index.json differs)."""
    base = tmp_path_factory.mktemp("repos")
    plus = write_tiny_edit_repo(base / "edit_plus", "edit_plus")
    edit = base / "edit"
    shutil.copytree(plus, edit)
    index = json.loads((edit / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    return {"edit": str(edit), "edit_plus": str(plus)}


@pytest.fixture(scope="module")
def encoders(repos):
    """Loaded once (fp32); one `Encoders` per variant over the same models, so compiled programs are shared."""
    loaded = Encoders.load(repos["edit_plus"], "edit_plus", CacheOptions(dtype="float32"))
    out = {"edit_plus": loaded, "edit": Encoders(loaded.vae, loaded.encoder, "edit")}
    yield out
    for e in out.values():
        e.close()


def _vae_input(img: Image.Image, size) -> np.ndarray:
    x = np.asarray(resize(img, *size), np.float32) / 127.5 - 1.0
    return x.transpose(2, 0, 1)[None]


@pytest.fixture(scope="module")
def diffusers_vae(repos):
    """diffusers' `AutoencoderKLQwenImage` loaded from the tiny repo's `vae/` (fp32): the reference latents."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage.from_pretrained(os.path.join(repos["edit_plus"], "vae")).eval()


def reference(enc: Encoders, vae, variant: str, target: str, controls, prompt: str, sizing: Sizing,
              negative: str | None = " "):
    """One sample without batching or caching code: latents from diffusers' VAE `vae` on our resized images
    (`torch_encode`: posterior mode, normalised as the pipelines do), prompt embeddings from our encoder
    (its parity with diffusers' `encode_prompt` is tests/test_text_encoder_prompt.py's)."""
    t = Image.open(target).convert("RGB")
    out = {"target": torch_encode(vae, _vae_input(t, buckets.target_size(*t.size, sizing)))[0]}
    refs = [Image.open(c).convert("RGB") for c in controls]
    if sizing.control_resolution == "pipeline":
        xs = [vae_pixels(r, plan_sizes([r], variant).vae[0])[None] for r in refs]
    elif sizing.control_resolution == "target":
        xs = [_vae_input(r, buckets.target_size(*t.size, sizing)) for r in refs]
    else:
        xs = [_vae_input(r, calculate_dimensions(sizing.control_resolution ** 2, r.width / r.height)) for r in refs]
    out["references"] = [torch_encode(vae, np.asarray(x, np.float32))[0] for x in xs]
    images = refs[0] if variant == "edit" else refs
    for key, text in (("prompt", prompt), ("negative", negative)):
        if text is not None:
            e, m = enc.encoder.encode_prompt(text, images, variant=variant)
            assert np.asarray(m).all()
            out[key] = np.asarray(e)[0]
    return out



def assert_matches(ds: CachedDataset, expected: dict[str, dict]):
    assert sorted(info.sample_id for info in ds.infos) == sorted(expected)
    for i in range(len(ds)):
        s = ds[i]
        ref = expected[s.sample_id]
        assert_close(s.target, ref["target"], LATENT_TOL, f"{s.sample_id} target latents vs diffusers' VAE")
        assert [r.shape for r in s.references] == [r.shape for r in ref["references"]]
        for k, (a, b) in enumerate(zip(s.references, ref["references"])):
            assert_close(a, b, LATENT_TOL, f"{s.sample_id} reference {k} latents vs diffusers' VAE")
        assert s.prompt_mask.all()
        assert_close(s.prompt_embeds, ref["prompt"], EMBED_TOL, f"{s.sample_id} prompt embeds vs unbatched")
        if "negative" in ref:
            assert s.negative_prompt_mask.all()
            assert_close(s.negative_prompt_embeds, ref["negative"], EMBED_TOL,
                         f"{s.sample_id} negative embeds vs unbatched")
        else:
            assert s.negative_prompt_embeds is None


def test_edit_folder_cache_equals_components(tmp_path, repos, encoders, diffusers_vae):
    """Edit (one reference), folder layout, references resized to the target's bucket (musubi's default)."""
    specs = [("a", (96, 64), "make it red"), ("b", (64, 64), "add a hat, keep the face"), ("c", (64, 32), "snow")]
    root = folder_dataset(tmp_path / "d", specs)
    masks = {"a": rand_image(tmp_path / "d" / "mask" / "a.png", 96, 64, seed=7, mode="L"),
             "c": rand_image(tmp_path / "d" / "mask" / "c.webp", 64, 32, seed=8)}  # RGB: read as greyscale
    sizing = Sizing(64, control_resolution="target")
    res = cache_dataset(root, tmp_path / "cache", repos["edit"], CacheOptions(
        resolution=64, control_resolution="target", batch_size=2, dtype="float32", progress=False),
        encoders=encoders["edit"], log=lambda m: None)
    assert (res.samples, res.encoded, res.resumed_from) == (3, 3, 0)
    ds = CachedDataset(tmp_path / "cache", verify=True)
    expected = {s: reference(encoders["edit"], diffusers_vae, "edit", os.path.join(root, f"{s}.png"),
                             [os.path.join(root, "control", f"{s}.jpg")], p, sizing) for s, _, p in specs}
    assert_matches(ds, expected)
    for i in range(len(ds)):
        assert ds[i].references[0].shape == ds[i].target.shape
    assert sorted(ds[i].target.shape[1:] for i in range(3)) == [(4, 8), (8, 8), (8, 8)]  # c is not enlarged
    for i in range(len(ds)):  # masks: PIL's Lanczos resize to the target's bucket, then 8x8 block means
        s = ds[i]
        if s.sample_id not in masks:
            assert s.mask is None
            continue
        h, w = s.target.shape[1:]
        g = Image.open(masks[s.sample_id]).convert("L").resize((8 * w, 8 * h), Image.Resampling.LANCZOS)
        want = (np.asarray(g, np.float64) / 255).reshape(h, 8, w, 8).mean(axis=(1, 3))
        assert_close(s.mask, want, 2e-6, f"{s.sample_id} cached mask vs PIL resize + area mean")  # measured 1.7e-7
    assert ds.metadata["variant"] == "edit" and ds.metadata["report"]["bad"] == []
    assert not os.path.exists(partial_path(str(tmp_path / "cache")))


def test_edit_plus_metadata_cache_equals_components(tmp_path, repos, encoders, diffusers_vae):
    """Edit-Plus, DiffSynth JSON with one or two references of different sizes, references at area 64²."""
    rows = [{"image": "imgs/t1.png", "edit_image": ["imgs/e1.png", "imgs/e2.png"], "prompt": "two refs"},
            {"image": "imgs/t2.png", "edit_image": "imgs/e3.png", "prompt": "one ref", "mask": "imgs/t2.png"}]
    root = _metadata_dataset(tmp_path, "json", rows)
    sizing = Sizing(64, control_resolution=64)
    opts = CacheOptions(resolution=64, control_resolution=64, dtype="float32", progress=False, batch_size=2,
                        negative_prompt="ugly")
    cache_dataset(root, tmp_path / "cache", repos["edit_plus"], opts, encoders=encoders["edit_plus"],
                  log=lambda m: None)
    ds = CachedDataset(tmp_path / "cache")
    expected = {}
    for r in rows:
        refs = r["edit_image"] if isinstance(r["edit_image"], list) else [r["edit_image"]]
        expected[os.path.splitext(r["image"])[0]] = reference(
            encoders["edit_plus"], diffusers_vae, "edit_plus", os.path.join(root, r["image"]),
            [os.path.join(root, p) for p in refs], r["prompt"], sizing, negative="ugly")
    assert_matches(ds, expected)
    assert [len(ds[i].references) for i in range(2)] != [1, 1]
    assert [info.has_mask for info in ds.infos] == [s.sample_id == "imgs/t2" for s in (ds[0], ds[1])]


def test_text_to_image_rows_use_qwen_image_template(tmp_path, repos, encoders):
    """With --allow-no-reference, metadata rows without a reference image are cached as text-to-image pairs
    beside the edit pairs: no reference latents, and prompt (and blank negative prompt) embeddings equal to
    diffusers' `QwenImagePipeline.encode_prompt` on the tiny repo's text encoder (transformers, fp32); the
    trainer batches them as their own layout without reference tokens."""
    import torch
    import transformers
    from diffusers import QwenImagePipeline

    rows = [{"image": "imgs/t1.png", "edit_image": "imgs/e1.png", "prompt": "edit one"},
            {"image": "imgs/t2.png", "prompt": "a red fox in the snow"},
            {"image": "imgs/e2.png", "prompt": "two cats on a wall, photo"}]
    root = _metadata_dataset(tmp_path, "jsonl", rows)
    opts = CacheOptions(resolution=64, control_resolution=64, dtype="float32", progress=False, batch_size=2)
    with pytest.raises(caching.BadInput):  # without the flag a row without a reference is bad input
        cache_dataset(root, tmp_path / "refused", repos["edit"], opts, encoders=encoders["edit"], log=lambda m: None)
    res = cache_dataset(root, tmp_path / "cache", repos["edit"], dataclasses.replace(opts, allow_no_reference=True),
                        encoders=encoders["edit"], log=lambda m: None)
    assert res.samples == 3
    ds = CachedDataset(tmp_path / "cache")
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        os.path.join(repos["edit"], "text_encoder"), torch_dtype=torch.float32).eval()
    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(os.path.join(repos["edit"], "tokenizer"))
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=None)
    by_id = {ds[i].sample_id: ds[i] for i in range(len(ds))}
    assert len(by_id["imgs/t1"].references) == 1
    for sid, row in (("imgs/t2", rows[1]), ("imgs/e2", rows[2])):
        s = by_id[sid]
        assert s.references == [] and len(ds.infos[[i.sample_id for i in ds.infos].index(sid)].img_shapes) == 1
        for text, embeds in ((row["prompt"], s.prompt_embeds), (" ", s.negative_prompt_embeds)):
            with torch.no_grad():
                ref, _ = pipe.encode_prompt(text, device=torch.device("cpu"), max_sequence_length=1024)
            assert_close(embeds, ref[0].numpy(), EMBED_TOL, f"{sid} t2i embeds of {text!r} vs QwenImagePipeline")
    loader = BatchLoader(ds, batch_size=1, text_buckets=(128,), prefetch=0, shuffle=False)
    batches = [next(loader) for _ in range(loader.steps_per_epoch)]
    t2i = [b for b in batches if b.sample_ids[0] != "imgs/t1"]
    assert len(t2i) == 2 and all(len(b.img_shapes) == 1 and b.arrays["references"].shape == (1, 1, 0, 64)
                                 for b in t2i)


def test_skip_bad_caches_the_good_and_reports_the_rest(tmp_path, repos, encoders):
    root = bad_dataset(tmp_path / "d")
    opts = CacheOptions(resolution=64, control_resolution=64, dtype="float32", progress=False)
    with pytest.raises(caching.BadInput, match="10 of 13 samples have bad input") as e:
        cache_dataset(root, tmp_path / "cache", repos["edit"], opts, encoders=encoders["edit"], log=lambda m: None)
    assert len(e.value.report.good) == 3
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(partial_path(str(tmp_path / "cache")))
    logs = []
    opts = CacheOptions(resolution=64, control_resolution=64, dtype="float32", progress=False, skip_bad=True,
                        negative_prompt=None, batch_size=2)
    res = cache_dataset(root, tmp_path / "cache", repos["edit"], opts, encoders=encoders["edit"], log=logs.append)
    assert res.samples == 3 and res.report.bad_samples == 10
    ds = CachedDataset(tmp_path / "cache")
    assert sorted(i.sample_id for i in ds.infos) == ["good1", "good2", "good3"]
    assert ds[0].negative_prompt_embeds is None
    bad = ds.metadata["report"]["bad"]
    assert {b["sample"] for b in bad} == set(EXPECTED_BAD)
    assert any("skipping 10 of 13 samples" in m for m in logs)


def assert_same_cache(a: CachedDataset, b: CachedDataset, kept: dict[str, str] | None = None):
    """b (interrupted and resumed) equals a (uninterrupted): the same samples in the same order and shards,
    the same shapes and masks, tensors equal up to float rounding (XLA:CPU's multithreaded kernels are not
    always bitwise reproducible from one process to the next; in one process and in most runs they are
    bitwise equal), and the shards kept from before the interruption byte for byte what they were."""
    assert [i.sample_id for i in a.infos] == [i.sample_id for i in b.infos]
    assert [(s["file"], s["num_samples"]) for s in a.shards] == [(s["file"], s["num_samples"]) for s in b.shards]
    for i in range(len(a)):
        x, y = a[i], b[i]
        for name in ("target", "prompt_embeds", "negative_prompt_embeds"):
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype, (x.sample_id, name)
            assert_close(v, u, RESUME_TOL, f"{x.sample_id} {name}, resumed vs uninterrupted")
        for name in ("prompt_mask", "negative_prompt_mask"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert [r.shape for r in x.references] == [r.shape for r in y.references]
        for r, t in zip(x.references, y.references):
            assert_close(t, r, RESUME_TOL, f"{x.sample_id} reference latents, resumed vs uninterrupted")
    for shard in b.shards:
        if kept and shard["file"] in kept:
            assert shard["sha256"] == kept[shard["file"]], shard["file"]


def shard_hashes(folder) -> dict[str, str]:
    """{shard file: sha256} of the shards a partial cache has recorded."""
    out = {}
    for name in os.listdir(folder):
        if name.startswith("shard-") and name.endswith(".json"):
            rec = json.loads(open(os.path.join(folder, name)).read())["shard"]
            out[rec["file"]] = rec["sha256"]
    return out


def test_resume_after_interruption_gives_identical_tensors(tmp_path, repos, encoders):
    """Stopped after 2 of 4 batches (shards flushed per batch), rerun: the kept shards are untouched and the
    rest equals one clean run; a different option refuses to resume; a complete cache reruns as a no-op."""
    specs = [(f"s{i}", size, f"edit number {i}") for i, size in enumerate([(64, 64), (96, 64)] * 4)]
    root = folder_dataset(tmp_path / "d", specs)
    opts = CacheOptions(resolution=64, control_resolution=64, dtype="float32", batch_size=2, progress=False,
                        shard_bytes=1)
    clean = cache_dataset(root, tmp_path / "clean", repos["edit"], opts, encoders=encoders["edit"],
                          log=lambda m: None)
    assert clean.samples == 8

    class Stop(Exception):
        pass

    def stop_after_two(done):
        if done == 4:
            raise Stop

    out = tmp_path / "cache"
    with pytest.raises(Stop):
        cache_dataset(root, out, repos["edit"], opts, encoders=encoders["edit"], log=lambda m: None,
                      on_batch=stop_after_two)
    partial = partial_path(str(out))
    assert sorted(os.listdir(partial)) == ["job.json", "shard-00000.json", "shard-00000.safetensors",
                                           "shard-00001.json", "shard-00001.safetensors"]
    assert not os.path.exists(out)
    kept = shard_hashes(partial)
    open(os.path.join(partial, ".shard-00002.safetensors.tmp-killed"), "wb").close()  # a killed shard write
    with pytest.raises(FileExistsError, match="different job .*resolution 64 -> 96.*--overwrite"):
        cache_dataset(root, out, repos["edit"], CacheOptions(**{**opts.__dict__, "resolution": 96}),
                      encoders=encoders["edit"], log=lambda m: None)
    logs = []
    res = cache_dataset(root, out, repos["edit"], opts, encoders=encoders["edit"], log=logs.append)
    assert (res.resumed_from, res.encoded) == (4, 4) and any("4 of 8 samples already cached" in m for m in logs)
    assert_same_cache(CachedDataset(tmp_path / "clean"), CachedDataset(out), kept)
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # the killed write's temporary is gone
    again = cache_dataset(root, out, repos["edit"], opts, encoders=encoders["edit"], log=lambda m: None)
    assert again.already_complete and again.encoded == 0


def test_plan_batches_resume_on_batch_boundaries():
    class G:
        def __init__(self, layout):
            self.layout = layout

    samples = [G(1)] * 5 + [G(2)] * 3
    full = plan_batches(samples, 2)
    assert [list(r) for r in full] == [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert plan_batches(samples, 2, start=4) == full[2:]
    assert [list(r) for r in plan_batches(samples, 3, start=2)] == [[2, 3, 4], [5, 6, 7]]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, repos, encoders):
    """Four Edit samples of one layout, cached."""
    d = tmp_path_factory.mktemp("small")
    specs = [(f"s{i}", (64, 64), f"turn it {c}") for i, c in enumerate(["red", "blue", "green", "grey"])]
    root = folder_dataset(d / "data", specs)
    opts = CacheOptions(resolution=64, control_resolution=64, dtype="float32", progress=False, batch_size=2)
    cache_dataset(root, d / "cache", repos["edit"], opts, encoders=encoders["edit"], log=lambda m: None)
    return str(d / "cache")


def test_training_loader_reads_the_cache(small_cache):
    ds = CachedDataset(small_cache, verify=True)
    loader = BatchLoader(ds, batch_size=2, text_buckets=(128, 256), prefetch=0)
    batch = next(loader)
    assert batch.arrays["target"].shape == (1, 2, 16, 64) and batch.arrays["references"].shape == (1, 2, 16, 64)
    assert batch.arrays["prompt_embeds"].shape[-1] == ds.joint_attention_dim == 64
    assert np.isfinite(batch.arrays["prompt_embeds"]).all() and batch.arrays["prompt_mask"].any(axis=-1).all()


@pytest.mark.slow
def test_lora_training_runs_on_the_cache(small_cache, tmp_path):
    """Two LoRA steps of the trainer on a tiny DiT whose text width matches the tiny encoder's (64)."""
    model = make_demo_checkpoint(str(tmp_path / "dit"), LatentDemo(preset="tiny"))
    cfg = config_from_dict({
        "model": {"path": model, "param_dtype": "float32", "dtype": "float32", "remat": "none"},
        "lora": {"rank": 2, "alpha": 2},
        "data": {"path": small_cache, "batch_size": 2, "text_buckets": [128], "prefetch": 0},
        "train": {"max_steps": 2, "save_every": 2, "progress": False}})
    res = train(cfg, tmp_path / "run", log=lambda m: None)
    assert res.final_step == 2
