"""Find (image, mask) pairs in a dataset as it is distributed, and give each pair a key.

Layouts: the standard SOD datasets' folder pairs (searched in SRC and in each folder directly
inside it, where an archive's top folder usually is), any pair of folders (`folders`, with
--images/--masks), and a text file of `image_path mask_path` lines (`list`). `auto` picks the one
standard layout present and refuses to guess between two.

Pairing is by file stem; extensions are matched case-insensitively. A stem shared by two images
(or two masks) is ambiguous and reported like an unpaired file, never resolved by a guess.

Keys are the stem when it is made of letters, digits, '-' and '_' only; any other stem (dots,
spaces, ...) is rewritten with '_' and suffixed with a hash of the original stem, so that no two
stems can end with the same key. A member name splits at its first dot (as webdataset splits it;
salnet.shards.format), so a key must have none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from salnet.shards.manifest import ShardsError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

# layout -> (images folder, masks folder) candidates, as the official archives unpack.
STANDARD_LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "duts": [("DUTS-TR-Image", "DUTS-TR-Mask"), ("DUTS-TE-Image", "DUTS-TE-Mask")],
    "ecssd": [("images", "ground_truth_mask")],
    "hkuis": [("imgs", "gt")],
    "pascals": [("datasets/imgs/pascal", "datasets/masks/pascal")],
    "dutomron": [("DUT-OMRON-image", "pixelwiseGT-new-PNG")],
}
LAYOUTS = ["auto", *STANDARD_LAYOUTS, "folders", "list"]


@dataclass(frozen=True)
class Pair:
    key: str
    image: str  # where to read it
    mask: str
    image_source: str  # as recorded in KEY.json and the manifest: relative to SRC (or as listed)
    mask_source: str


@dataclass
class Found:
    layout: str
    description: str  # which folders or list were used, for the console and the manifest
    pairs: list[Pair]
    unpaired: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    ignored: list[str] = field(default_factory=list)  # files that are not images (Thumbs.db, ...)


def find_pairs(src: Path, layout: str = "auto", images: str | None = None, masks: str | None = None) -> Found:
    if layout not in LAYOUTS:
        raise ShardsError(f"unknown layout '{layout}'; valid: {', '.join(LAYOUTS)}")
    if (images is None) != (masks is None):
        raise ShardsError("--images and --masks go together (the two folders of the 'folders' layout)")
    if images is not None:
        if layout not in ("auto", "folders"):
            raise ShardsError(
                f"--images/--masks select the 'folders' layout; they cannot be combined with --layout {layout}"
            )
        layout = "folders"
    if not src.exists():
        raise ShardsError(f"source '{src}' does not exist")
    if layout == "list" or (layout == "auto" and src.is_file()):
        return _from_list(src)
    if not src.is_dir():
        raise ShardsError(
            f"source '{src}' is a file; only the 'list' layout reads a file (lines of 'image_path mask_path')"
        )
    if layout == "folders":
        if images is None:
            raise ShardsError("the 'folders' layout needs --images DIR and --masks DIR (relative to SRC or absolute)")
        return _from_folders(src, "folders", src / images, src / masks)
    wanted = list(STANDARD_LAYOUTS) if layout == "auto" else [layout]
    found = [(name, img, msk) for name in wanted for img, msk in _candidates(src, name)]
    if len(found) == 1:
        return _from_folders(src, *found[0])
    looked = "; ".join(f"{name}: {i}/ + {m}/" for name in wanted for i, m in STANDARD_LAYOUTS[name])
    if not found:
        raise ShardsError(
            f"no {'known' if layout == 'auto' else layout} layout found in '{src}' or the folders directly inside it "
            f"(looked for {looked}); for other folders use --images DIR --masks DIR, or --layout list with a file of "
            "'image_path mask_path' lines"
        )
    options = "\n  ".join(f"{name}: {_rel(img, src)}/ + {_rel(msk, src)}/" for name, img, msk in found)
    raise ShardsError(
        f"'{src}' holds several datasets, refusing to guess which to pack:\n  {options}\n"
        "point SRC at the folder of one of them, or name the folders with --images/--masks"
    )


def _candidates(src: Path, layout: str) -> list[tuple[Path, Path]]:
    roots = [src] + sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [
        (root / img, root / msk)
        for root in roots
        for img, msk in STANDARD_LAYOUTS[layout]
        if (root / img).is_dir() and (root / msk).is_dir()
    ]


def _rel(path: Path, src: Path) -> str:
    return Path(os.path.relpath(path, src)).as_posix()


class _File(NamedTuple):
    name: str
    path: str  # to read it
    source: str  # relative to SRC, for KEY.json and the manifest


def _from_folders(src: Path, layout: str, image_dir: Path, mask_dir: Path) -> Found:
    for role, folder in (("images", image_dir), ("masks", mask_dir)):
        if not folder.is_dir():
            raise ShardsError(f"{role} folder '{folder}' does not exist or is not a folder")
    ignored: list[str] = []
    image_stems = _by_stem(image_dir, src, ignored)
    mask_stems = _by_stem(mask_dir, src, ignored)
    pairs, unpaired = [], []
    for stem in sorted(image_stems.keys() | mask_stems.keys()):
        imgs, msks = image_stems.get(stem, []), mask_stems.get(stem, [])
        if len(imgs) == 1 and len(msks) == 1:
            pairs.append(Pair(make_key(stem), imgs[0].path, msks[0].path, imgs[0].source, msks[0].source))
            continue
        for files, role, others in ((imgs, "image", msks), (msks, "mask", imgs)):
            other_role, other_dir = ("mask", mask_dir) if role == "image" else ("image", image_dir)
            for f in files:
                if len(files) > 1:
                    reason = (
                        f"ambiguous: {len(files)} {role}s share the stem '{stem}' ({', '.join(f.name for f in files)})"
                    )
                elif others:
                    reason = f"its {other_role} is ambiguous: {len(others)} {other_role}s share the stem '{stem}'"
                else:
                    reason = f"no {other_role} with the stem '{stem}' in {_rel(other_dir, src)}/"
                unpaired.append({"path": f.source, "reason": reason})
    description = f"images {_rel(image_dir, src)}/, masks {_rel(mask_dir, src)}/"
    return Found(layout, description, _unique_keys(pairs), unpaired, ignored)


def _by_stem(folder: Path, src: Path, ignored: list[str]) -> dict[str, list[_File]]:
    # os.scandir and plain strings: a DUTS-sized folder is listed in milliseconds, not seconds.
    prefix = _rel(folder, src) + "/"
    stems: dict[str, list[_File]] = defaultdict(list)
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):  # .DS_Store, macOS "._x.jpg" resource forks
                continue
            stem, ext = os.path.splitext(entry.name)
            source = (prefix + entry.name).removeprefix("./")
            if entry.is_file() and ext.lower() in IMAGE_EXTENSIONS:
                stems[stem].append(_File(entry.name, entry.path, source))
            else:
                ignored.append(source)
    return stems


def list_file_lines(list_file: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, line, its fields) for each non-empty line of a list file: shell-style quoting,
    `#` comments. A line that cannot be split is an error naming the file and line."""
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        try:
            fields = shlex.split(line, comments=True)
        except ValueError as e:
            raise ShardsError(f"{list_file}:{number}: cannot parse {line!r} ({e})") from None
        if fields:
            yield number, line, fields


def _from_list(list_file: Path) -> Found:
    base = list_file.parent
    pairs, unpaired, seen = [], [], {}
    for number, line, fields in list_file_lines(list_file):
        if len(fields) != 2:
            raise ShardsError(
                f"{list_file}:{number}: expected 'image_path mask_path', got {len(fields)} fields "
                f"in {line!r} (quote paths that contain spaces)"
            )
        image, mask = fields
        if image in seen:
            unpaired.append({"path": image, "reason": f"listed again on line {number} (first on line {seen[image]})"})
            continue
        seen[image] = number
        pairs.append(Pair(make_key(Path(image).stem), str(base / image), str(base / mask), image, mask))
    return Found("list", f"list {list_file.name}", _unique_keys(pairs), unpaired, [])


def _unique_keys(pairs: list[Pair]) -> list[Pair]:
    """Sorted by key. Equal keys (one stem in two listed folders) get a hash of their distinct paths."""
    counts = Counter(p.key for p in pairs)
    return sorted(
        (
            p if counts[p.key] == 1 else dataclasses.replace(p, key=f"{p.key}-{_short_hash(p.image_source)}")
            for p in pairs
        ),
        key=lambda p: p.key,
    )


def make_key(stem: str) -> str:
    clean = re.sub(r"[^\w-]", "_", unicodedata.normalize("NFC", stem))
    return clean if clean == stem and clean else f"{clean}-{_short_hash(stem)}"


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
