"""Per-file checks before anything is encoded, each failure with its reason; the images' one loader.

Every image is decoded in full here (the only way to find a truncated file), with the same
`load_image` the encoder uses later, so what passes here encodes the same way. What happens to
each kind of file (`load_image`):

| file | result |
|---|---|
| 8-bit RGB | used as is |
| greyscale (L, 1-bit), palette without transparency, YCbCr, RGBX | converted to RGB exactly; greyscale gets a note |
| 16-bit greyscale (I;16) or 16 bits per channel RGB | reduced to 8 bits (what the pipeline's PIL path sees), a note |
| alpha channel, fully opaque | alpha dropped (nothing changes) |
| alpha with transparent pixels | **bad** ("…% transparent"), unless `alpha_background`: composited over it, a note |
| CMYK | **bad**: a conversion without the colour profile shifts colours; convert to sRGB first |
| 32-bit integer or float pixels, other modes (LAB, HSV, …) | **bad**: no defined 8-bit RGB meaning |
| unreadable, corrupt, truncated, missing, empty, decompression bomb | **bad**, with PIL's reason |
| EXIF orientation | applied (as diffusers' `load_image` does), a note |
| animated (several frames) | the first frame, a note |

Masks (`mask/` by stem, or a metadata `mask` field): decoded and converted to 8-bit greyscale (white =
the loss counts, black = it does not, grey = a weight); a mask whose size differs from its target's is bad.

Captions: read as UTF-8 (a BOM is dropped), surrounding whitespace stripped; a missing, non-UTF-8
or (unless allowed) empty caption is bad. A sample is bad when any of its files is.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import struct
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from ..imaging import Size
from .buckets import SizeError, Sizing, reference_vae_size, target_size
from .layouts import Listing, Problem, RawSample

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")
RELEASED_MAX_REFERENCES = 3  # Edit-Plus was trained with up to 3


class BadImage(ValueError):
    """An image that cannot be used; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What validation learned about one image file."""

    path: str
    width: int  # after EXIF orientation
    height: int
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GoodSample:
    """A validated sample: its prompt text and the sizes everything is encoded at."""

    sample_id: str
    target: str
    controls: tuple[str, ...]
    prompt: str
    target_size: Size
    control_sizes: tuple[Size, ...]
    origin: str
    mask: str | None = None  # the target's loss mask image

    @property
    def layout(self) -> tuple[Size, ...]:
        """Target size then reference VAE sizes: samples of one layout batch together."""
        return (self.target_size, *self.control_sizes)


@dataclasses.dataclass
class Report:
    """Validation outcome: good samples, bad files/rows with reasons, notes about converted files."""

    dataset: str
    kind: str
    good: list[GoodSample]
    bad: list[Problem]
    converted: list[Problem]
    notes: list[str]
    total: int

    @property
    def bad_samples(self) -> int:
        return self.total - len({g.origin for g in self.good})  # a sample cached at several resolutions counts once

    def to_json(self) -> dict:
        item = lambda p: {"file": p.where, "reason": p.reason, "sample": p.sample_id}  # noqa: E731
        return {"dataset": self.dataset, "layout": self.kind, "samples": self.total, "good": len(self.good),
                "bad_samples": self.bad_samples, "bad": [item(p) for p in self.bad],
                "converted": [item(p) for p in self.converted], "notes": list(self.notes)}


# ---- images ----------------------------------------------------------------------------------------
def parse_background(text: str | None) -> tuple[int, int, int] | None:
    """`--alpha-background` value (white, black, #rrggbb, any PIL colour name) → RGB, or None."""
    if text is None:
        return None
    try:
        rgb = ImageColor.getrgb(text)
    except ValueError:
        raise ValueError(f"--alpha-background {text!r}: not a colour (use white, black or #rrggbb)") from None
    return tuple(rgb[:3])  # type: ignore[return-value]


def png_bit_depth(path: str) -> int | None:
    """Bits per channel from a PNG header (PIL reads 16-bit RGB PNGs as 8-bit RGB and does not say)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">B", head[24:25])[0]
    return None


def _sixteen_to_rgb(img: Image.Image) -> Image.Image:
    a = np.asarray(img).astype(np.float64)
    grey = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def _deep(im: Image.Image, path: str) -> bool:
    """More than 8 bits per channel in the file (PIL decodes 16-bit RGB to 8 bits and does not say)."""
    if im.format == "PNG":
        return (png_bit_depth(path) or 8) > 8
    if im.format == "TIFF":
        return max(np.atleast_1d(im.tag_v2.get(258, (8,)))) > 8  # BitsPerSample
    return False


def _to_rgb(img: Image.Image, deep: bool, png: bool,
            background: tuple[int, int, int] | None) -> tuple[Image.Image, list[str]]:
    """Convert a decoded image to 8-bit RGB under the rules of the module docstring."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode == "RGB":
        return img, ["16 bits per channel, reduced to 8"] if deep else []
    if mode in ("L", "1"):
        return img.convert("RGB"), [("greyscale" if mode == "L" else "1-bit black and white") + ", converted to RGB"]
    if mode in ("YCbCr", "RGBX"):
        return img.convert("RGB"), []
    if mode in SIXTEEN_BIT_GREY or (mode == "I" and png):
        return _sixteen_to_rgb(img), ["16-bit greyscale, reduced to 8 bits and converted to RGB"]
    if mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        transparent = float(np.mean(np.asarray(rgba.getchannel("A")) < 255))
        notes = ["16 bits per channel, reduced to 8"] if deep else []
        if transparent == 0:
            return rgba.convert("RGB"), notes
        if background is None:
            raise BadImage(f"has transparent pixels ({transparent:.1%} of the image) and the VAE takes RGB: pass "
                           f"--alpha-background white (or black, #rrggbb) to composite them, or flatten the file")
        name = {(255, 255, 255): "white", (0, 0, 0): "black"}.get(background, "#%02x%02x%02x" % background)
        notes.append(f"{transparent:.1%} transparent pixels composited over {name}")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB"), notes
    if mode == "CMYK":
        raise BadImage("CMYK colour space: convert it to RGB (sRGB) first; converting without its colour profile "
                       "shifts colours")
    if mode in ("I", "F") or mode.startswith("I;"):
        kind = "floating-point" if mode == "F" else "32-bit integer"
        raise BadImage(f"{kind} pixels (mode {mode}) have no defined 8-bit range: save it as 8-bit RGB")
    raise BadImage(f"unsupported image mode {mode}: save it as 8-bit RGB")


def load_image(path: str, background: tuple[int, int, int] | None = None) -> tuple[Image.Image, tuple[str, ...]]:
    """Decode `path` fully as an 8-bit RGB PIL image (EXIF orientation applied) and the notes about what
    was converted; `BadImage` with the reason when it cannot be used."""
    notes = []
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                notes.append(f"animated ({frames} frames): the first frame is used")
            im.load()
            deep, png = _deep(im, path), im.format == "PNG"
            if im.getexif().get(0x0112, 1) not in (1, None):
                notes.append("rotated by its EXIF orientation")
            img = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise BadImage("empty file" if size == 0 else "not an image PIL can read (unknown format or corrupt "
                       "header)") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        msg = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise BadImage(f"{kind} image data ({msg})") from None
    if min(img.size) < 1:
        raise BadImage(f"has no pixels ({img.width}×{img.height})")
    rgb, more = _to_rgb(img, deep, png, background)
    return rgb, tuple(notes + more)


def load_mask(path: str) -> Image.Image:
    """Decode a loss mask fully as an 8-bit greyscale PIL image (EXIF orientation applied); `BadImage` says why
    it cannot be used."""
    try:
        with Image.open(path) as im:
            im.load()
            img = ImageOps.exif_transpose(im)
        return img.convert("L")
    except FileNotFoundError:
        raise BadImage("mask file not found") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, UnidentifiedImageError,
            Image.DecompressionBombError) as e:
        raise BadImage(f"not a readable mask image ({str(e) or type(e).__name__})") from None


def check_image(path: str, background: tuple[int, int, int] | None = None) -> ImageInfo:
    """Validate one image (full decode); `BadImage` says why it cannot be used."""
    img, notes = load_image(path, background)
    return ImageInfo(path, img.width, img.height, notes)


def read_caption(path: str, *, allow_empty: bool = False) -> str:
    """The caption text of a `.txt` file: UTF-8 (BOM dropped), stripped; ValueError names the problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ValueError(f"missing caption {path}") from None
    except OSError as e:
        raise ValueError(f"unreadable caption {path} ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return check_prompt(text, allow_empty=allow_empty, what="caption")


def check_prompt(text: str, *, allow_empty: bool = False, what: str = "prompt") -> str:
    """Strip a prompt; an empty one is an error unless allowed."""
    text = text.strip()
    if not text and not allow_empty:
        raise ValueError(f"{what} is empty (pass --allow-empty-prompt to train on an empty instruction)")
    if "\x00" in text:
        raise ValueError(f"{what} contains a NUL character (binary file?)")
    return text


# ---- samples ---------------------------------------------------------------------------------------
def check_reference_count(n: int, variant: str, allow_none: bool = False) -> str | None:
    """Why `n` references do not fit `variant` (None if they do); `allow_none`: 0 is a text-to-image pair."""
    if n == 0:
        if allow_none:
            return None
        return ("no reference image (the edit models need the image to edit; pass --allow-no-reference to "
                "train such rows as text-to-image pairs)")
    if variant == "edit" and n != 1:
        return (f"{n} reference images, but Qwen-Image-Edit takes exactly one; use an Edit-Plus model "
                f"(Qwen-Image-Edit-2509/2511) for several")
    return None


def validate(listing: Listing, variant: str, sizing: Sizing | Sequence[Sizing], *, background: tuple[int, int, int] | None = None,
             allow_empty_prompt: bool = False, allow_no_reference: bool = False, workers: int | None = None,
             progress: Callable[[int], None] | None = None) -> Report:
    """Check every file of every sample (images decoded in parallel threads); nothing is encoded.

    `sizing`: one, or several (`--resolution 512,768,1024`): then every good sample is listed once per
    resolution with the id `<id>@<resolution>`, except where a resolution gives the same sizes as an
    earlier one (a small image that is never enlarged); a size problem at any resolution makes it bad.
    `progress(n)` is called as images finish (for a progress bar).
    """
    sizings = (sizing,) if isinstance(sizing, Sizing) else tuple(sizing)
    several = len(sizings) > 1
    same_size = 0
    bad: list[Problem] = list(listing.problems)
    converted: list[Problem] = []
    paths = sorted({p for s in listing.samples for p in (s.target, *s.controls)})
    infos: dict[str, ImageInfo | BadImage] = {}
    workers = workers or min(16, (os.cpu_count() or 2) * 2)

    def one(path: str) -> ImageInfo | BadImage:
        try:
            return check_image(path, background)
        except BadImage as e:
            return e

    def one_mask(path: str) -> ImageInfo | BadImage:
        try:
            m = load_mask(path)
            return ImageInfo(path, m.width, m.height)
        except BadImage as e:
            return e

    mask_paths = sorted({s.mask for s in listing.samples if s.mask is not None})
    with concurrent.futures.ThreadPoolExecutor(workers, "validate") as pool:
        for path, info in zip(paths, pool.map(one, paths)):
            infos[path] = info
            if progress is not None:
                progress(1)
        masks = dict(zip(mask_paths, pool.map(one_mask, mask_paths)))
    good: list[GoodSample] = []
    noted: set[str] = set()
    for s in listing.samples:
        problems = _sample_problems(s, infos, variant, allow_no_reference)
        if s.mask is not None:
            m, t = masks[s.mask], infos[s.target]
            if isinstance(m, BadImage):
                problems.append(Problem(s.mask, str(m), s.sample_id))
            elif isinstance(t, ImageInfo) and (m.width, m.height) != (t.width, t.height):
                problems.append(Problem(s.mask, f"mask is {m.width}×{m.height} px, its target {s.target} is "
                                        f"{t.width}×{t.height}: a mask must have its target's size", s.sample_id))
        try:
            prompt = (read_caption(s.caption_file, allow_empty=allow_empty_prompt) if s.prompt is None
                      else check_prompt(s.prompt, allow_empty=allow_empty_prompt))
        except ValueError as e:
            problems.append(Problem(s.caption_file or s.origin, str(e), s.sample_id))
        layouts: list[tuple[int, tuple[Size, ...]]] = []
        if not problems:
            for sz in sizings:
                sizes, size_problem = _sizes(s, infos, sz)
                if size_problem is not None:
                    where = f" (at --resolution {sz.resolution})" if several else ""
                    problems.append(dataclasses.replace(size_problem, reason=size_problem.reason + where))
                    break
                if any(sizes == seen for _, seen in layouts):
                    same_size += 1
                    continue
                layouts.append((sz.resolution, sizes))
        if problems:
            bad.extend(problems)
            continue
        for p in (s.target, *s.controls):
            info = infos[p]
            if isinstance(info, ImageInfo) and info.notes and p not in noted:
                noted.add(p)
                converted.append(Problem(p, "; ".join(info.notes), s.sample_id))
        for res, sizes in layouts:
            sid = f"{s.sample_id}@{res}" if several else s.sample_id
            good.append(GoodSample(sid, s.target, s.controls, prompt, sizes[0], sizes[1:], s.origin, s.mask))
    notes = list(listing.notes)
    if same_size:
        notes.append(f"{same_size} sample copies are not cached twice: their images are smaller than a larger "
                     f"--resolution and are never enlarged, so they would repeat a smaller resolution's sizes")
    many = sum(len(g.controls) > RELEASED_MAX_REFERENCES for g in good)
    if many:
        notes.append(f"{many} samples have more than {RELEASED_MAX_REFERENCES} reference images; the released "
                     f"Edit-Plus models were trained with up to {RELEASED_MAX_REFERENCES}")
    total = len(listing.samples) + len({p.where for p in listing.problems if p.sample_id is None}) + len(
        {p.sample_id for p in listing.problems if p.sample_id is not None})
    return Report(listing.source, listing.kind, good, bad, converted, notes, total)


def _sample_problems(s: RawSample, infos: dict, variant: str, allow_no_reference: bool = False) -> list[Problem]:
    out = []
    why = check_reference_count(len(s.controls), variant, allow_no_reference)
    if why is not None:
        out.append(Problem(s.origin, why, s.sample_id))
    for p in (s.target, *s.controls):
        info = infos[p]
        if isinstance(info, BadImage):
            out.append(Problem(p, str(info), s.sample_id))
    return out


def _sizes(s: RawSample, infos: dict, sizing: Sizing) -> tuple[tuple[Size, ...] | None, Problem | None]:
    t = infos[s.target]
    try:
        target = target_size(t.width, t.height, sizing)
    except SizeError as e:
        return None, Problem(s.target, str(e), s.sample_id)
    out = [target]
    for c in s.controls:
        info = infos[c]
        try:
            out.append(reference_vae_size(info.width, info.height, target, sizing))
        except SizeError as e:
            return None, Problem(c, str(e), s.sample_id)
    return tuple(out), None


def format_report(report: Report, *, limit: int = 50) -> list[str]:
    """Lines for the terminal: bad files grouped by file with their reason and samples."""
    lines = []
    grouped: dict[tuple[str, str], list[str]] = {}
    for p in report.bad:
        grouped.setdefault((p.where, p.reason), []).append(p.sample_id or "")
    for i, ((where, reason), ids) in enumerate(grouped.items()):
        if i == limit:
            lines.append(f"  … and {len(grouped) - limit} more (see --report)")
            break
        ids = [x for x in ids if x]
        who = f" [sample{'s' if len(ids) > 1 else ''} {', '.join(ids[:3])}{', …' if len(ids) > 3 else ''}]" \
            if len(ids) > 1 or (ids and ids[0] not in where) else ""
        lines.append(f"  {where}: {reason}{who}")
    return lines


__all__ = ["BadImage", "GoodSample", "ImageInfo", "Report", "check_image", "check_prompt", "check_reference_count",
           "format_report", "load_image", "load_mask", "parse_background", "png_bit_depth", "read_caption",
           "validate"]
