"""Pack a dataset folder (or list) into shards: find pairs, prepare them on worker processes, write.

Workers read, check and encode samples (the only expensive part: decoding for validation); the
main process only appends their bytes to the tar in a fixed order, so the output does not depend
on the number of workers. A bad file stops the pack with its path and reason (the partial shards
are removed), or with --skip-bad / --skip-unpaired it is skipped, counted on the console and
listed with its reason in the manifest.

An image whose size differs from its mask's (DUTS-TE has such pairs) is what --on-mismatch says:
`fail` (default) treats it as a bad file, `skip` leaves it out (counted, listed under "skipped"),
`resize` resizes the image to its mask, the ground truth (counted, listed under "resized").
Nothing is decoded above --max-pixels, and no file above --max-member-bytes is read or written
(the loader refuses members above its own limit, data.max_member_bytes).
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from salnet.imagecheck import DEFAULT_MAX_PIXELS
from salnet.shards.format import sample_meta
from salnet.shards.images import BadFileError, SizeMismatch, prepare_image, prepare_mask, read_file, upright_size
from salnet.shards.layouts import Pair, find_pairs
from salnet.shards.manifest import ShardsError
from salnet.shards.parallel import ordered_map
from salnet.shards.tario import DEFAULT_MAX_MEMBER_BYTES
from salnet.shards.writer import EncodedSample, Sample, ShardWriter, prepare_out_dir

DEFAULT_SHARD_SAMPLES = 1000
DEFAULT_SHARD_BYTES = 512 * 2**20
LIST_LIMIT = 20  # how many problem files a message names before "... and N more"
ON_MISMATCH = ("fail", "resize", "skip")


@dataclass
class Bad:
    """A pair that cannot be packed (returned by workers, not raised, so the main process decides)."""

    path: str
    reason: str
    mismatch: bool = False  # image and mask sizes differ (--on-mismatch decides)


def pack(
    src: os.PathLike | str,
    out: os.PathLike | str,
    *,
    layout: str = "auto",
    images: str | None = None,
    masks: str | None = None,
    name: str | None = None,
    shard_samples: int | None = DEFAULT_SHARD_SAMPLES,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    shuffle_seed: int | None = 0,
    max_side: int | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    skip_unpaired: bool = False,
    overwrite: bool = False,
    on_mismatch: str = "fail",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    command: str | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> dict[str, Any]:
    """Pack SRC into OUT; return the manifest. Raises ShardsError naming the problem on bad input."""
    src, out = Path(src), Path(out)
    name = name if name is not None else out.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", name):
        raise ShardsError(
            f"dataset name {name!r} may hold only letters, digits, '-' and '_', and may not start with '-' "
            "(it starts every shard file name); pass --name"
        )
    for flag, value in (
        ("--shard-samples", shard_samples),
        ("--shard-bytes", shard_bytes),
        ("--max-side", max_side),
        ("--workers", workers),
        ("--max-pixels", max_pixels),
        ("--max-member-bytes", max_member_bytes),
    ):
        if value is not None and value < 1:
            raise ShardsError(f"{flag} must be at least 1, got {value}")
    if on_mismatch not in ON_MISMATCH:
        raise ShardsError(f"--on-mismatch must be one of {', '.join(ON_MISMATCH)}, got {on_mismatch!r}")

    found = find_pairs(src, layout, images, masks)
    log(f"pack: layout '{found.layout}' ({found.description}): {len(found.pairs)} pairs")
    if found.ignored:
        log(f"pack: ignored {len(found.ignored)} files that are not images: {_names(found.ignored)}")
    if found.unpaired and not skip_unpaired:
        count = len(found.unpaired)
        raise ShardsError(
            f"cannot pair {count} file{'s' if count > 1 else ''} in '{src}':\n"
            + _problems(found.unpaired)
            + "\nfix the folders, or pass --skip-unpaired to skip them (they are listed in the manifest)"
        )
    skipped = list(found.unpaired)

    prepare_out_dir(out, overwrite)
    pairs = list(found.pairs)  # sorted by key: the order does not depend on the file system
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(pairs)

    started = time.perf_counter()
    prepare = partial(
        prepare_pair,
        dataset=name,
        max_side=max_side,
        on_mismatch=on_mismatch,
        max_pixels=max_pixels,
        max_member_bytes=max_member_bytes,
    )
    resized: list[dict[str, Any]] = []
    with ShardWriter(out, name, shard_samples, shard_bytes) as writer:
        for result in ordered_map(prepare, pairs, workers, desc=f"pack {name}"):
            if isinstance(result, Bad):
                if not (skip_bad or (result.mismatch and on_mismatch == "skip")):
                    raise ShardsError(
                        f"bad input in '{src}': {result.path}: {result.reason}\n"
                        "pass --skip-bad to skip such files (they are listed in the manifest)"
                    )
                skipped.append({"path": result.path, "reason": result.reason})
                continue
            if result.resized_from is not None:
                resized.append(
                    {
                        "image": result.meta["source"],
                        "mask": result.meta["mask_source"],
                        "from": list(result.resized_from),
                        "to": list(result.meta["orig_size"]),
                    }
                )
            writer.add(result)
        manifest = writer.finish(
            layout=found.layout,
            command=command or f"salnet.shards.pack.pack({str(src)!r}, {str(out)!r})",
            skipped=skipped,
            resized=resized,
            source={"path": str(src), "found": found.description},
            options={
                "shard_samples": shard_samples,
                "shard_bytes": shard_bytes,
                "shuffle_seed": shuffle_seed,
                "max_side": max_side,
                "skip_bad": skip_bad,
                "skip_unpaired": skip_unpaired,
                "on_mismatch": on_mismatch,
                "max_pixels": max_pixels,
                "max_member_bytes": max_member_bytes,
            },
        )
    seconds = time.perf_counter() - started
    log(
        f"pack: wrote {manifest['total_samples']} samples in {len(manifest['shards'])} shards "
        f"({manifest['total_bytes'] / 2**20:.1f} MiB) to {out} in {seconds:.1f} s "
        f"({manifest['total_samples'] / max(seconds, 1e-9):.0f} samples/s)"
    )
    stats = manifest["stats"]
    for what, counts in (
        ("images re-encoded", stats["image_conversions"]),
        ("masks converted", stats["mask_conversions"]),
    ):
        if counts:
            log(f"pack: {what}: " + ", ".join(f"{how} ({n})" for how, n in counts.items()))
    if resized:
        log(
            f'pack: resized {len(resized)} images to their masks\' size (--on-mismatch resize; listed under "resized" '
            f"in {out / 'manifest.json'}):\n"
            + _problems(
                [
                    {
                        "path": r["image"],
                        "reason": f"{r['from'][1]}x{r['from'][0]} -> "
                        f"{r['to'][1]}x{r['to'][0]} (WxH), the size of {r['mask']}",
                    }
                    for r in resized
                ]
            )
        )
    if skipped:
        log(
            f'pack: skipped {len(skipped)} files (listed with reasons under "skipped" in {out / "manifest.json"}):\n'
            + _problems(skipped)
        )
    return manifest


def prepare_pair(
    pair: Pair,
    dataset: str,
    max_side: int | None,
    on_mismatch: str = "fail",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> EncodedSample | Bad:
    """Read, check and encode one pair (runs on a worker process)."""
    try:
        image_data = _read(pair.image, pair.image_source, max_member_bytes)
        mask_data = _read(pair.mask, pair.mask_source, max_member_bytes)
        resize_to = upright_size(mask_data, pair.mask_source, max_pixels) if on_mismatch == "resize" else None
        image = prepare_image(image_data, pair.image_source, max_side, max_pixels, resize_to=resize_to)
        mask = prepare_mask(
            mask_data, pair.mask_source, image.orig_size, image.stored_size, pair.image_source, max_pixels
        )
        for path, what, data in ((pair.image_source, "image", image.data), (pair.mask_source, "mask", mask.data)):
            if len(data) > max_member_bytes:
                raise BadFileError(
                    path,
                    f"the {what} encodes to {len(data)} bytes, above the limit of {max_member_bytes} bytes "
                    "for one shard member (--max-member-bytes)",
                )
    except SizeMismatch as e:
        return Bad(e.path, e.reason, mismatch=True)
    except BadFileError as e:
        return Bad(e.path, e.reason)
    meta = sample_meta(
        key=pair.key,
        dataset=dataset,
        source=pair.image_source,
        mask_source=pair.mask_source,
        orig_size=image.orig_size,
        stored_size=image.stored_size,
    )
    return Sample(
        key=pair.key,
        image_ext=image.ext,
        image=image.data,
        mask=mask.data,
        meta=meta,
        foreground=mask.foreground,
        soft_mask=mask.soft,
        conversions=image.conversions,
        mask_conversions=mask.conversions,
        resized_from=image.resized_from,
    ).encoded()


def _read(path: str, shown_as: str, max_bytes: int) -> bytes:
    return read_file(
        path,
        max_bytes,
        "for one shard member (the loader refuses larger members); not read. If it is genuine, raise "
        "the limit with --max-member-bytes (and data.max_member_bytes for training)",
        shown_as,
    )


def _problems(entries: list[dict[str, str]]) -> str:
    lines = [f"  {e['path']}: {e['reason']}" for e in entries[:LIST_LIMIT]]
    if len(entries) > LIST_LIMIT:
        lines.append(f"  ... and {len(entries) - LIST_LIMIT} more ({len(entries)} in all)")
    return "\n".join(lines)


def _names(paths: list[str], limit: int = 5) -> str:
    return ", ".join(paths[:limit]) + (f" ... ({len(paths)} in all)" if len(paths) > limit else "")
