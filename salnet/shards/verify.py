"""`verify`: prove a shard directory is what its manifest says, down to every decoded sample.

Each shard (on worker processes) is re-hashed against the manifest, read as a tar, split into
samples, and every sample is checked against the sample format (salnet.shards.format): exactly
an image (.jpg or .png), a .mask.png and a .json; the image decodes to 8-bit RGB, the mask to
8-bit gray of the same size; the json names the key and the stored size. Then the counts and
the uniqueness of keys across shards. Every problem is reported with its shard and sample;
nothing stops at the first one.

Verify reads a shard as the loader does (salnet.shards.tario, salnet.imagecheck): a compressed
shard or a member above --max-member-bytes is reported and not read; an image or mask whose
header declares more than --max-pixels is reported and not decoded; a 16-bit image or a mask
that is not an 8-bit grey PNG is reported (the loader would refuse it).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from salnet.imagecheck import DEFAULT_MAX_PIXELS, ImageError, check_shard_member, pillow_limit
from salnet.shards.format import IMAGE_EXTS, MASK_EXT, META_EXT, member_key_problem, split_member_name
from salnet.shards.manifest import MANIFEST_NAME, read_manifest
from salnet.shards.parallel import ordered_map
from salnet.shards.tario import DEFAULT_MAX_MEMBER_BYTES, ShardTar, TarRefused

HASH_CHUNK = 1 << 20


@dataclass
class ShardReport:
    file: str
    samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    shard_dir: Path
    shards: int
    samples: int
    problems: list[str]
    notes: list[str]  # not errors: e.g. stray files next to the shards

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    shard_dir: Path,
    workers: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Report:
    """Check every shard and sample of `shard_dir`; raises ManifestError only if the manifest is unusable."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    check = partial(verify_shard, shard_dir, max_pixels=max_pixels, max_member_bytes=max_member_bytes)
    reports = list(ordered_map(check, manifest["shards"], workers, desc="verify", unit="shard"))
    problems = [p for r in reports for p in r.problems]
    counts = Counter(key for r in reports for key in r.keys)
    duplicates = sorted(key for key, n in counts.items() if n > 1)
    if duplicates:
        problems.append(
            f"{len(duplicates)} keys occur more than once (in one shard or across shards): {', '.join(duplicates[:20])}"
        )
    samples = sum(r.samples for r in reports)
    if samples != manifest["total_samples"]:
        problems.append(
            f"the shards hold {samples} samples, the manifest's total_samples is {manifest['total_samples']}"
        )
    listed = {s["file"] for s in manifest["shards"]} | {MANIFEST_NAME}
    stray = sorted(p.name for p in shard_dir.iterdir() if p.name not in listed)
    notes = [f"files not in the manifest (ignored by readers): {', '.join(stray)}"] if stray else []
    return Report(shard_dir, len(reports), samples, problems, notes)


def verify_shard(
    shard_dir: Path,
    shard: dict[str, Any],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> ShardReport:
    report = ShardReport(shard["file"])
    path = shard_dir / shard["file"]
    if not path.is_file():
        report.problems.append(f"{shard['file']}: missing")
        return report
    size, digest = _size_and_sha256(path)
    if size != shard["bytes"]:
        report.problems.append(f"{shard['file']}: {size} bytes, the manifest says {shard['bytes']}")
    if digest != shard["sha256"]:
        report.problems.append(f"{shard['file']}: sha256 differs from the manifest (the file changed after packing)")
    try:
        with open(path, "rb") as f:
            tar = ShardTar(f, max_member_bytes)
            for key, members in _samples(tar, report):
                report.samples += 1
                report.keys.append(key)
                report.problems.extend(
                    f"{shard['file']}: sample '{key}': {p}" for p in check_sample(key, members, max_pixels)
                )
            end = tar.offset
        # tarfile stops quietly at a corrupt header; only zero blocks may follow the last member.
        if _nonzero_after(path, end):
            report.problems.append(
                f"{shard['file']}: tar structure broken at byte {end} of {size} (corrupt header?); "
                "nothing after it could be read"
            )
    except TarRefused as e:
        report.problems.append(f"{shard['file']}: refused after {report.samples} samples: {e}")
    except (tarfile.TarError, OSError, EOFError) as e:
        report.problems.append(f"{shard['file']}: unreadable as tar after {report.samples} samples: {e}")
    if report.samples != shard["samples"]:
        report.problems.append(f"{shard['file']}: holds {report.samples} samples, the manifest says {shard['samples']}")
    return report


def _size_and_sha256(path: Path) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _nonzero_after(path: Path, offset: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(HASH_CHUNK):
            if chunk.count(0) != len(chunk):
                return True
    return False


def _samples(tar: ShardTar, report: ShardReport):
    """Yield (key, {extension: bytes}) for each run of consecutive members sharing a key."""
    key, members, first_bad_key, bad_keys = None, {}, None, 0
    for info in tar:
        name = info.name
        if not info.isfile() or "." not in name:
            report.problems.append(f"{report.file}: unexpected member '{name}' (want KEY.ext files at the top level)")
            continue
        problem = member_key_problem(name)
        if problem:  # the reader's rule; said once per shard, as a badly made tar breaks it in every member
            if first_bad_key is None:
                first_bad_key = len(report.problems)
                report.problems.append(f"{report.file}: {problem}")
            bad_keys += 1
            continue
        member_key, ext = split_member_name(name)
        if member_key != key:
            if key is not None:
                yield key, members
            key, members = member_key, {}
        if ext in members:
            report.problems.append(f"{report.file}: sample '{key}' has '{ext}' twice")
        members[ext] = tar.read(info)
    if key is not None:
        yield key, members
    if bad_keys > 1:
        report.problems[first_bad_key] += f" (and {bad_keys - 1} more members like it)"


def check_sample(key: str, members: dict[str, bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str]:
    problems = []
    images = [ext for ext in IMAGE_EXTS if ext in members]
    expected = {MASK_EXT, META_EXT, *images[:1]}
    if len(images) != 1 or set(members) != expected:
        problems.append(
            f"has members {sorted(members)}; a sample needs an image ({' or '.join(IMAGE_EXTS)}), "
            f"'{MASK_EXT}' and '{META_EXT}'"
        )
    image = _decoded(members, images[0], "RGB", problems, max_pixels) if len(images) == 1 else None
    mask = _decoded(members, MASK_EXT, "L", problems, max_pixels)
    if image is not None and mask is not None and image.size != mask.size:
        problems.append(f"mask is {mask.size[0]}x{mask.size[1]} (WxH) but the image is {image.size[0]}x{image.size[1]}")
    if META_EXT in members:
        try:
            meta = json.loads(members[META_EXT])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return problems + [f"{META_EXT} does not parse: {e}"]
        if not isinstance(meta, dict) or meta.get("key") != key:
            problems.append(f"{META_EXT} 'key' is {meta.get('key') if isinstance(meta, dict) else meta!r}, not '{key}'")
        elif image is not None and meta.get("stored_size") != [image.size[1], image.size[0]]:
            problems.append(
                f"{META_EXT} stored_size {meta.get('stored_size')} differs from the image's [H, W] {[image.size[1], image.size[0]]}"
            )
    return problems


def _decoded(members: dict[str, bytes], ext: str, mode: str, problems: list[str], max_pixels: int):
    if ext not in members:
        return None
    try:
        check_shard_member(members[ext], ext, max_pixels, mask=ext == MASK_EXT)  # the header, before decoding
    except ImageError as e:
        problems.append(str(e))
        return None
    try:
        with pillow_limit(max_pixels):
            im = Image.open(io.BytesIO(members[ext]))
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is the finding we report
        problems.append(f"{ext} does not decode: {e}")
        return None
    if im.mode != mode:
        problems.append(f"{ext} has mode {im.mode}, expected {mode}")
    return im
