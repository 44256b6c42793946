"""Write samples into tar shards and finish with the manifest, so that nothing half-done looks done.

Shards are written as `NAME-000000.tar.partial`, ... and renamed to `.tar` only after the last
sample, immediately before the manifest (itself written to a temporary name and renamed). A pack
killed at any point therefore leaves no manifest and no `.tar` that could pass for a complete shard.

Tar headers are fixed (mtime 0, uid/gid 0, no user or group names, mode 0644, PAX format, UTF-8
names), so the same samples in the same order give byte-identical shards on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL

import salnet
from salnet.fsio import fsync_dir
from salnet.shards.format import MASK_EXT, META_EXT, member_name
from salnet.shards.manifest import FORMAT, MANIFEST_NAME, VERSION, ShardsError, write_manifest

PARTIAL_SUFFIX = ".partial"
TAR_FORMAT = tarfile.PAX_FORMAT


@dataclass
class Sample:
    """One sample, encoded and ready to write; the numbers feed the manifest's statistics."""

    key: str
    image_ext: str  # one of format.IMAGE_EXTS: what the image bytes are
    image: bytes
    mask: bytes  # 8-bit grayscale PNG
    meta: dict[str, Any]  # becomes KEY.json (format.sample_meta); holds orig_size and stored_size as [H, W]
    foreground: float  # fraction of mask pixels >= 128
    soft_mask: bool  # the mask has values other than 0 and 255
    conversions: tuple[str, ...] = ()  # why the image was re-encoded; empty when the source bytes were kept
    mask_conversions: tuple[
        str, ...
    ] = ()  # how the mask was converted (salnet.shards.images); empty when kept as it was
    resized_from: tuple[int, int] | None = None  # (H, W) of an image resized to its mask (pack --on-mismatch resize)

    def members(self) -> list[tuple[str, bytes]]:
        meta = json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return [
            (member_name(self.key, self.image_ext), self.image),
            (member_name(self.key, MASK_EXT), self.mask),
            (member_name(self.key, META_EXT), meta),
        ]

    def encoded(self) -> EncodedSample:
        """The members as they appear in the archive (header(s), data, padding to 512 bytes), with
        the numbers the statistics need. tarfile encodes the headers; the bytes are joined here
        rather than by TarFile.addfile so that a pack's workers can do it: the writer, the one
        serial step, then only appends, and half as many bytes cross between processes."""
        parts = []
        for name, data in self.members():
            parts += [
                _tar_info(name, len(data)).tobuf(TAR_FORMAT, "utf-8", "surrogateescape"),
                data,
                bytes(-len(data) % tarfile.BLOCKSIZE),
            ]
        return EncodedSample(
            self.key,
            b"".join(parts),
            self.meta,
            self.foreground,
            self.soft_mask,
            self.conversions,
            self.mask_conversions,
            self.resized_from,
        )


@dataclass(frozen=True)
class EncodedSample:
    """What ShardWriter.add needs of a sample: its archive bytes and its statistics."""

    key: str
    tar_bytes: bytes
    meta: dict[str, Any]
    foreground: float
    soft_mask: bool
    conversions: tuple[str, ...]
    mask_conversions: tuple[str, ...] = ()
    resized_from: tuple[int, int] | None = None

    def encoded(self) -> EncodedSample:
        return self


def shard_file_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create OUT, or empty it of a previous pack when `overwrite`; refuse anything else non-empty."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardsError(f"output '{out_dir}' exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    present = sorted(p for p in out_dir.iterdir())
    if not present:
        return
    if not overwrite:
        what = (
            "a complete dataset"
            if (out_dir / MANIFEST_NAME).exists()
            else f"{len(present)} entries but no {MANIFEST_NAME} (an interrupted pack?)"
        )
        raise ShardsError(
            f"output directory '{out_dir}' is not empty: it holds {what}; "
            "pass --overwrite to replace it, or choose an empty or new directory"
        )
    # Only a previous pack's own files are removed: --overwrite on the wrong directory must not
    # delete someone's data.
    ours = [
        p
        for p in present
        if p.is_file() and (p.name.endswith(".tar") or p.name.endswith(PARTIAL_SUFFIX) or p.name == MANIFEST_NAME)
    ]
    foreign = [p.name for p in present if p not in ours]
    if foreign:
        raise ShardsError(
            f"--overwrite only removes a previous pack's files (*.tar, *{PARTIAL_SUFFIX}, {MANIFEST_NAME}), "
            f"but '{out_dir}' also holds {', '.join(foreign[:10])}{' ...' if len(foreign) > 10 else ''}; "
            "move them away or choose another output directory"
        )
    # The manifest goes first: from then on the directory no longer claims to be complete.
    for p in sorted(ours, key=lambda p: p.name != MANIFEST_NAME):
        p.unlink()
    fsync_dir(out_dir)


class _HashingFile:
    """A write-only file that also hashes and counts what goes through it (one pass over the bytes)."""

    def __init__(self, path: Path):
        self.file = open(path, "xb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _closed_size(offset: int) -> int:
    """Size of an archive closed at `offset`: two zero blocks, then padding to a full record."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


@dataclass
class _Stats:
    orig_h: list[int] = field(default_factory=list)
    orig_w: list[int] = field(default_factory=list)
    stored_h: list[int] = field(default_factory=list)
    stored_w: list[int] = field(default_factory=list)
    foreground: list[float] = field(default_factory=list)
    soft_masks: int = 0
    kept_original: int = 0
    conversions: Counter = field(default_factory=Counter)
    mask_conversions: Counter = field(default_factory=Counter)

    def add(self, sample: EncodedSample) -> None:
        (oh, ow), (sh, sw) = sample.meta["orig_size"], sample.meta["stored_size"]
        self.orig_h.append(oh)
        self.orig_w.append(ow)
        self.stored_h.append(sh)
        self.stored_w.append(sw)
        self.foreground.append(sample.foreground)
        self.soft_masks += sample.soft_mask
        self.kept_original += not sample.conversions
        self.conversions.update(sample.conversions)
        self.mask_conversions.update(sample.mask_conversions)

    def summary(self) -> dict[str, Any]:
        return {
            "orig_height": _summary(self.orig_h),
            "orig_width": _summary(self.orig_w),
            "stored_height": _summary(self.stored_h),
            "stored_width": _summary(self.stored_w),
            "foreground_ratio": _summary(self.foreground),
            "soft_masks": self.soft_masks,
            "images_kept_original": self.kept_original,
            "image_conversions": dict(sorted(self.conversions.items())),
            "mask_conversions": dict(sorted(self.mask_conversions.items())),
        }


def _summary(values: list) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "mean": round(statistics.fmean(values), 4),
        "median": statistics.median(values),
        "max": max(values),
    }


class ShardWriter:
    """`with ShardWriter(...) as w: w.add(sample) ...; w.finish(...)`; an exception removes the partial shards."""

    def __init__(self, out_dir: Path, name: str, shard_samples: int | None, shard_bytes: int | None):
        self.out_dir, self.name = Path(out_dir), name
        self.shard_samples, self.shard_bytes = shard_samples, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.stats = _Stats()
        self._partials: list[Path] = []
        self._file: _HashingFile | None = None
        self._samples_in_shard = 0
        self._keys: set[str] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, sample: Sample | EncodedSample) -> None:
        sample = sample.encoded()
        if sample.key in self._keys:
            raise ShardsError(f"duplicate sample key '{sample.key}' (source {sample.meta.get('source')!r})")
        self._keys.add(sample.key)
        blob = sample.tar_bytes
        if self._file is not None and self._shard_full(len(blob)):
            self._close_shard()
        if self._file is None:
            self._open_shard()
        self._file.write(blob)
        self._samples_in_shard += 1
        self.stats.add(sample)

    def _shard_full(self, next_sample_bytes: int) -> bool:
        if self.shard_samples is not None and self._samples_in_shard >= self.shard_samples:
            return True
        return self.shard_bytes is not None and _closed_size(self._file.bytes + next_sample_bytes) > self.shard_bytes

    def _open_shard(self) -> None:
        path = self.out_dir / (shard_file_name(self.name, len(self._partials)) + PARTIAL_SUFFIX)
        self._partials.append(path)
        self._file = _HashingFile(path)
        self._samples_in_shard = 0

    def _close_shard(self) -> None:
        self._file.write(bytes(_closed_size(self._file.bytes) - self._file.bytes))  # end-of-archive blocks
        self._file.close()
        final = self._partials[-1].name.removesuffix(PARTIAL_SUFFIX)
        self.shards.append(
            {
                "file": final,
                "samples": self._samples_in_shard,
                "bytes": self._file.bytes,
                "sha256": self._file.sha256.hexdigest(),
            }
        )
        self._file = None

    def finish(self, *, layout: str, command: str, skipped: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
        """Close the last shard, rename every shard into place, then write the manifest."""
        if self._file is not None:
            self._close_shard()
        if not self.shards:
            raise ShardsError(
                f"no samples to write to '{self.out_dir}'" + (f" ({len(skipped)} skipped)" if skipped else "")
            )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "layout": layout,
            "command": command,
            "salnet_version": salnet.__version__,
            "pillow_version": PIL.__version__,
            **extra,
            "shards": self.shards,
            "total_samples": sum(s["samples"] for s in self.shards),
            "total_bytes": sum(s["bytes"] for s in self.shards),
            "stats": self.stats.summary(),
            "skipped": skipped,
        }
        for partial in self._partials:
            partial.replace(partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX)))
        fsync_dir(self.out_dir)
        write_manifest(self.out_dir, manifest)
        self._partials = []
        return manifest

    def abort(self) -> None:
        """Remove what this writer wrote; used when a pack fails part-way."""
        if self._file is not None:
            self._file.file.close()
            self._file = None
        for partial in self._partials:
            partial.unlink(missing_ok=True)
        self._partials = []
