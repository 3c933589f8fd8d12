"""Dataset layouts users already have → raw samples (target, references, prompt) and the problems found.

**Folder** (musubi-tuner, ai-toolkit): target images with same-stem captions, references matched by stem.

    DATASET/001.png  DATASET/001.txt        target (the edited image) + caption (`caption_ext`)
    DATASET/control/001.jpg                 its reference (any image extension)
    several references, either one folder each (ai-toolkit's control_path list):
    DATASET/control_0/001.png  DATASET/control_1/001.png  …   (ordered by the number)
    or musubi-tuner's numbered names in one folder:
    DATASET/control/001_0.png  DATASET/control/001_1.png  …   (ordered by the number)
    DATASET/mask/001.png                    optional loss mask of the target (white counts, black not)

**Metadata** (DiffSynth-Studio, musubi-tuner JSONL): `metadata.jsonl` / `.csv` / `.json` (a list of
objects) in the folder, or the file itself as the dataset. Per row:
    target      `image` (DiffSynth) or `image_path` (musubi)
    references  `edit_image` (one path or a list), or `control_path` (one path or a list), or
                `control_path_0`, `control_path_1`, … (ordered by the number)
    prompt      `prompt` (DiffSynth) or `caption` (musubi)
    mask        optional `mask` or `mask_path`: the target's loss mask (white counts, black not, grey between)
A relative path is looked up beside the metadata file first, then in the working directory (musubi's
historical rule). Other keys are ignored.

Sample ids: the target's stem (folder) or its path relative to the metadata folder without the
extension (metadata). Everything here only lists and stats files; `validate.py` reads them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif", ".jxl")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.json")
METADATA_EXTENSIONS = (".jsonl", ".csv", ".json")
LAYOUTS = ("auto", "folder", "metadata")
_NUMBERED = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)$")
_CONTROL_DIR = re.compile(r"^control(?:_(?P<n>\d+))?$")
MASK_DIR = "mask"


class LayoutError(ValueError):
    """The dataset as a whole cannot be read (no images, ambiguous folders, unreadable metadata file)."""


@dataclasses.dataclass(frozen=True)
class RawSample:
    """One sample as the layout declares it; paths are absolute and exist (missing ones are problems)."""

    sample_id: str
    target: str
    controls: tuple[str, ...]
    prompt: str | None  # metadata layouts; None → read `caption_file`
    caption_file: str | None  # folder layout
    origin: str  # where it was declared, for messages ("…/metadata.jsonl line 7", or the target path)
    mask: str | None = None  # the target's loss mask image (mask/ by stem, or a `mask` field)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why a sample (or a row that never became one) cannot be cached; `where` is the file or row."""

    where: str
    reason: str
    sample_id: str | None = None


@dataclasses.dataclass
class Listing:
    """What a layout reader found: samples, per-sample problems, and notes about ignored files."""

    kind: str  # "folder" | "metadata"
    source: str  # the dataset folder or the metadata file
    samples: list[RawSample]
    problems: list[Problem]
    notes: list[str]
    control_dirs: tuple[str, ...] = ()


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def _files(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))


def _by_stem(names: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(os.path.splitext(n)[0], []).append(n)
    return out


def _shorten(names: Sequence[str], n: int = 5) -> str:
    more = f", … ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---- folder layout -------------------------------------------------------------------------------
def find_control_dirs(root: str) -> tuple[str, ...]:
    """`control/` or `control_0/`, `control_1/`, … (numeric order) inside `root`; both kinds is an error."""
    found: dict[int | None, str] = {}
    for e in os.scandir(root):
        m = _CONTROL_DIR.match(e.name)
        if m and e.is_dir():
            found[None if m["n"] is None else int(m["n"])] = e.path
    if None in found and len(found) > 1:
        raise LayoutError(f"{root}: both control/ and numbered control_N/ folders; use control/ for one reference "
                          f"per sample (or musubi's stem_0, stem_1 names inside it), or control_0/, control_1/, … "
                          f"for several")
    if None in found:
        return (found[None],)
    return tuple(found[k] for k in sorted(found))  # type: ignore[index]


def _numbered_controls(stems: dict[str, list[str]], targets: set[str]) -> dict[str, dict[int, list[str]]]:
    """musubi's `stem_N.ext` files in one control folder, by target stem then N; a name that is itself the
    exact control of another target (`a_0.png` for target `a_0`) is not a numbered control of `a`."""
    out: dict[str, dict[int, list[str]]] = {}
    for stem, names in stems.items():
        m = _NUMBERED.match(stem)
        if m and m["stem"] in targets and stem not in targets:
            out.setdefault(m["stem"], {}).setdefault(int(m["n"]), []).extend(names)
    return out


def read_folder(root: str, *, control_dirs: Sequence[str] | None = None, caption_ext: str = ".txt",
                allow_no_reference: bool = False) -> Listing:
    """Target images + captions in `root`, references in `control_dirs` (default: `find_control_dirs`).
    `allow_no_reference`: a target with no reference in any of them is a text-to-image pair (no controls)."""
    root = os.path.abspath(root)
    names = _files(root)
    images = [n for n in names if is_image(n)]
    if not images:
        raise LayoutError(f"{root}: no images found (expected target images with {caption_ext} captions and a "
                          f"control/ folder, or a metadata.jsonl / .csv / .json)")
    dirs = tuple(os.path.abspath(d) for d in control_dirs) if control_dirs else find_control_dirs(root)
    for d in dirs:
        if not os.path.isdir(d):
            raise LayoutError(f"--control-dir {d}: not a folder")
    problems: list[Problem] = []
    notes: list[str] = []
    targets = _by_stem(images)
    control_stems = [_by_stem(n for n in _files(d) if is_image(n)) for d in dirs]
    numbered = _numbered_controls(control_stems[0], set(targets)) if len(dirs) == 1 else {}
    used: list[set[str]] = [set() for _ in dirs]
    mask_dir = os.path.join(root, MASK_DIR)
    masks = _by_stem(n for n in _files(mask_dir) if is_image(n)) if os.path.isdir(mask_dir) else {}
    samples = []
    for stem, files in sorted(targets.items()):
        if len(files) > 1:
            for f in files:
                problems.append(Problem(os.path.join(root, f), f"duplicate stem {stem!r}: {', '.join(files)} "
                                        f"(which one is the target?)", stem))
            continue
        target = os.path.join(root, files[0])
        bad: list[str] = []
        missing: list[str] = []
        controls: list[str] = []
        for k, (d, stems) in enumerate(zip(dirs, control_stems)):
            exact = stems.get(stem, [])
            nums = numbered.get(stem, {}) if len(dirs) == 1 else {}
            if exact and nums:
                bad.append(f"both {os.path.join(d, exact[0])} and numbered references "
                           f"{os.path.join(d, nums[min(nums)][0])}, …: use one naming")
                continue
            if nums:
                for n in sorted(nums):
                    if len(nums[n]) > 1:
                        bad.append(f"duplicate reference stem {stem}_{n} in {d}: {', '.join(nums[n])}")
                    controls.append(os.path.join(d, nums[n][0]))
                    used[k].add(os.path.splitext(nums[n][0])[0])
                continue
            if not exact:
                missing.append(f"missing reference image {os.path.join(d, stem)}.* for target {files[0]}")
            elif len(exact) > 1:
                bad.append(f"duplicate reference stem {stem!r} in {d}: {', '.join(exact)}")
            else:
                controls.append(os.path.join(d, exact[0]))
                used[k].add(stem)
        if missing and not (allow_no_reference and not controls and len(missing) == len(dirs)):
            bad.extend(missing)  # with --allow-no-reference only a target without any reference is a t2i pair
        caption = os.path.join(root, stem + caption_ext)
        if not os.path.isfile(caption):
            bad.append(f"missing caption {caption}")
        if len(masks.get(stem, [])) > 1:
            bad.append(f"duplicate mask stem {stem!r} in {mask_dir}: {', '.join(masks[stem])}")
        if bad:
            problems.extend(Problem(target, reason, stem) for reason in bad)
            continue
        mask = os.path.join(mask_dir, masks[stem][0]) if stem in masks else None
        samples.append(RawSample(stem, target, tuple(controls), None, caption, target, mask))
    orphan_masks = sorted(s for s in masks if s not in targets)
    if orphan_masks:
        notes.append(f"{len(orphan_masks)} images in {mask_dir} match no target image (ignored): "
                     f"{_shorten(orphan_masks)}")
    for d, stems, u in zip(dirs, control_stems, used):
        orphans = sorted(s for s in stems if s not in u and _NUMBERED.sub(r"\g<stem>", s) not in targets)
        if orphans:
            notes.append(f"{len(orphans)} images in {d} match no target image (ignored): {_shorten(orphans)}")
    others = [n for n in names if not is_image(n) and not n.endswith(caption_ext)]
    if others:
        notes.append(f"{len(others)} files in {root} are neither images nor {caption_ext} captions (ignored): "
                     f"{_shorten(others)}")
    folders = sorted(e.name + "/" for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                     and os.path.join(root, e.name) not in dirs and e.name != MASK_DIR)
    if folders:
        notes.append(f"folders in {root} other than the references are not read: {_shorten(folders)}")
    orphan_captions = [n for n in names if n.endswith(caption_ext) and os.path.splitext(n)[0] not in targets]
    if orphan_captions:
        notes.append(f"{len(orphan_captions)} captions have no image (ignored): {_shorten(orphan_captions)}")
    return Listing("folder", root, samples, problems, notes, dirs)


# ---- metadata layout -----------------------------------------------------------------------------
def find_metadata(folder: str) -> str | None:
    """The one `metadata.{jsonl,csv,json}` in `folder` (None if there is none; several is an error)."""
    found = [os.path.join(folder, n) for n in METADATA_NAMES if os.path.isfile(os.path.join(folder, n))]
    if len(found) > 1:
        raise LayoutError(f"{folder}: several metadata files ({', '.join(os.path.basename(f) for f in found)}); "
                          f"pass the one to use as --dataset")
    return found[0] if found else None


def read_rows(path: str) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """(where, row) per record of a metadata file, and the records that cannot be read."""
    ext = os.path.splitext(path)[1].lower()
    rows: list[tuple[str, Any]] = []
    problems: list[Problem] = []
    try:
        if ext == ".jsonl":
            with open(path, encoding="utf-8-sig") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path} line {n}"
                    try:
                        rows.append((where, json.loads(line)))
                    except json.JSONDecodeError as e:
                        problems.append(Problem(where, f"not valid JSON ({e.msg} at column {e.colno})"))
        elif ext == ".json":
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise LayoutError(f"{path}: expected a JSON list of objects (DiffSynth's metadata.json), "
                                  f"got {type(data).__name__}")
            rows = [(f"{path} entry {i}", r) for i, r in enumerate(data)]
        elif ext == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if not header:
                    raise LayoutError(f"{path}: empty CSV file (expected a header row such as image,edit_image,"
                                      f"prompt)")
                header = [h.strip() for h in header]
                while True:
                    try:
                        cells = next(reader)
                    except StopIteration:
                        break
                    except csv.Error as e:
                        problems.append(Problem(f"{path} line {reader.line_num}", f"unreadable CSV row ({e})"))
                        continue
                    where = f"{path} line {reader.line_num}"
                    if not any(c.strip() for c in cells):
                        continue
                    if len(cells) != len(header):
                        problems.append(Problem(where, f"has {len(cells)} fields, the header has {len(header)}"))
                        continue
                    rows.append((where, dict(zip(header, cells))))
        else:
            raise LayoutError(f"{path}: unknown metadata format {ext!r} (expected .jsonl, .csv or .json)")
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except OSError as e:
        raise LayoutError(f"{path}: cannot read ({e.strerror or e})") from None
    return rows, problems


def _paths(value: Any, key: str) -> list[str]:
    """A row's path field: one non-empty string or a list of them."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ValueError(f"{key} must be a path or a list of paths, got {value!r}")
    return [v.strip() for v in items]


def row_mask(row: dict[str, Any]) -> str | None:
    """A metadata row's optional loss mask path (`mask` or `mask_path`); ValueError says why it is unusable."""
    keys = [k for k in ("mask", "mask_path") if row.get(k) not in (None, "")]
    if len(keys) > 1:
        raise ValueError("has both 'mask' and 'mask_path': use one")
    if not keys:
        return None
    paths = _paths(row[keys[0]], keys[0])
    if len(paths) != 1:
        raise ValueError(f"{keys[0]} must be one path, got {len(paths)}")
    return paths[0]


def row_fields(row: Any) -> tuple[str, list[str], str]:
    """(target, references, prompt) of one metadata row in DiffSynth or musubi keys; ValueError says why not."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with image / edit_image / prompt, got {type(row).__name__}")
    present = {k: v for k, v in row.items() if v is not None and v != ""}
    target_keys = [k for k in ("image", "image_path") if k in present]
    if not target_keys:
        raise ValueError(f"no target image: needs 'image' (DiffSynth) or 'image_path' (musubi); keys are "
                         f"{sorted(row)}")
    if len(target_keys) > 1:
        raise ValueError("has both 'image' and 'image_path': use one")
    target = _paths(present[target_keys[0]], target_keys[0])
    if len(target) != 1:
        raise ValueError(f"{target_keys[0]} must be one path, got {len(target)}")
    numbered = sorted((int(k.rsplit("_", 1)[1]), k) for k in present
                      if re.fullmatch(r"control_path_\d+", k))
    kinds = [k for k in ("edit_image", "control_path") if k in present] + (["control_path_N"] if numbered else [])
    if len(kinds) > 1:
        raise ValueError(f"has several reference keys ({', '.join(kinds)}): use one")
    if "edit_image" in present or "control_path" in present:
        key = kinds[0]
        controls = _paths(present[key], key)
    else:
        controls = [_paths(present[k], k)[0] for _, k in numbered]
    prompt_keys = [k for k in ("prompt", "caption") if k in row]
    if not prompt_keys:
        raise ValueError(f"no prompt: needs 'prompt' (DiffSynth) or 'caption' (musubi); keys are {sorted(row)}")
    if len(prompt_keys) > 1:
        raise ValueError("has both 'prompt' and 'caption': use one")
    prompt = row[prompt_keys[0]]
    if not isinstance(prompt, str):
        raise ValueError(f"{prompt_keys[0]} must be text, got {prompt!r}")
    return target[0], controls, prompt


def resolve(path: str, base: str) -> str | None:
    """An absolute path: as given, else beside the metadata file, else in the working directory; None if missing."""
    path = os.path.expanduser(path)
    candidates = [path] if os.path.isabs(path) else [os.path.join(base, path), os.path.abspath(path)]
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    return None


def _metadata_id(target: str, base: str) -> str:
    rel = os.path.relpath(target, base)
    rel = target if rel.startswith("..") else rel
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def read_metadata(path: str) -> Listing:
    """Rows of a metadata file as samples; unreadable rows, missing files and duplicates as problems."""
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    rows, problems = read_rows(path)
    if not rows and not problems:
        raise LayoutError(f"{path}: no rows")
    candidates: list[RawSample] = []
    for where, row in rows:
        try:
            target, controls, prompt = row_fields(row)
            mask = row_mask(row)
        except ValueError as e:
            problems.append(Problem(where, str(e)))
            continue
        resolved = [resolve(p, base) for p in (target, *controls)]
        missing = [p for p, r in zip((target, *controls), resolved) if r is None]
        mask_path = None
        if mask is not None:
            mask_path = resolve(mask, base)
            if mask_path is None:
                missing.append(mask)
        sid = _metadata_id(resolved[0] or os.path.join(base, target), base)
        if missing:
            problems.extend(Problem(where, f"missing image {p} (looked beside {os.path.basename(path)} and in the "
                                    f"working directory)", sid) for p in missing)
            continue
        candidates.append(RawSample(sid, resolved[0], tuple(resolved[1:]), prompt, None, where, mask_path))
    by_id: dict[str, list[RawSample]] = {}
    for s in candidates:
        by_id.setdefault(s.sample_id, []).append(s)
    samples = []
    for sid, group in by_id.items():
        if len(group) == 1:
            samples.append(group[0])
            continue
        for s in group:
            others = ", ".join(o.origin[len(path) + 1:] for o in group if o is not s)
            problems.append(Problem(s.origin, f"duplicate target {s.target} (also {others})", sid))
    return Listing("metadata", path, samples, problems, [])


# ---- either --------------------------------------------------------------------------------------
def read_dataset(path: str | os.PathLike, *, layout: str = "auto", control_dirs: Sequence[str] = (),
                 caption_ext: str = ".txt", allow_no_reference: bool = False) -> Listing:
    """Read a dataset in any supported layout (`layout`: auto, folder or metadata)."""
    path = os.path.abspath(os.fspath(path))
    if layout not in LAYOUTS:
        raise LayoutError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if not os.path.exists(path):
        raise LayoutError(f"--dataset {path}: no such file or folder")
    if os.path.isfile(path):
        if layout == "folder":
            raise LayoutError(f"--dataset {path}: a file, but --layout folder needs a folder")
        if not path.lower().endswith(METADATA_EXTENSIONS):
            raise LayoutError(f"--dataset {path}: expected a folder or a metadata .jsonl / .csv / .json file")
        if control_dirs:
            raise LayoutError("--control-dir applies to the folder layout; metadata rows name their references")
        return read_metadata(path)
    metadata = find_metadata(path) if layout != "folder" else None
    if layout == "metadata" and metadata is None:
        raise LayoutError(f"--dataset {path}: no {', '.join(METADATA_NAMES)} in this folder")
    if metadata is not None:
        if control_dirs:
            raise LayoutError("--control-dir applies to the folder layout; metadata rows name their references")
        listing = read_metadata(metadata)
        if any(is_image(n) and os.path.isfile(os.path.splitext(os.path.join(path, n))[0] + caption_ext)
               for n in _files(path)):
            listing.notes.append(f"{metadata} is used; the images with {caption_ext} captions beside it are read "
                                 f"only through it (pass --layout folder to use the captions instead)")
        return listing
    return read_folder(path, control_dirs=control_dirs, caption_ext=caption_ext,
                       allow_no_reference=allow_no_reference)


__all__ = ["IMAGE_EXTENSIONS", "LAYOUTS", "LayoutError", "Listing", "MASK_DIR", "METADATA_NAMES", "Problem",
           "RawSample",
           "find_control_dirs", "find_metadata", "is_image", "read_dataset", "read_folder", "read_metadata",
           "read_rows", "resolve", "row_fields", "row_mask"]
