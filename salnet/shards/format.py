"""The shard sample format: which tar members make a sample, how they are named, what KEY.json holds.

A sample is consecutive tar members sharing a key, each named KEY.EXT (`member_name`):

    KEY.jpg or KEY.png   the image, 8-bit RGB (IMAGE_EXTS)
    KEY.mask.png         the mask, 8-bit single channel, soft values kept (MASK_EXT)
    KEY.json             the metadata (META_EXT, `sample_meta`): {"key", "dataset", "source",
                         "mask_source", "orig_size": [H, W], "stored_size": [H, W]}

A member name splits at its first dot (`split_member_name`), as webdataset splits it, so the
extension may hold dots ("mask.png") and a key may not: keys are made of letters, digits, '-' and
'_' (`salnet.shards.layouts.make_key`), and every reader holds a shard to that (`is_valid_key`):
a key names files (predict writes OUT/DATASET/KEY.png), so one with a '/' or '..' could reach
outside the folder meant for it, and './KEY.jpg' (a tar made with `tar -C DIR .`) has the empty
key. The writer, verify, the loader's reader and transforms and the benchmarks all spell the
format through this module. Pure Python, no torch: the packing tools import it too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

JPEG_EXT = "jpg"
PNG_EXT = "png"
IMAGE_EXTS = (JPEG_EXT, PNG_EXT)  # what pack writes, and all that verify accepts
MASK_EXT = "mask.png"
META_EXT = "json"

# Image extension -> codec, in the order the loader looks for them. The loader also reads the
# "jpeg" spelling, which other WebDataset writers use; verify holds a pack to IMAGE_EXTS.
READABLE_IMAGE_EXTS: dict[str, str] = {JPEG_EXT: "jpeg", "jpeg": "jpeg", PNG_EXT: "png"}


KEY_RULE = "one or more letters, digits, '-' and '_', so no '/', '.' or '\\'"
_KEY = re.compile(r"[\w-]+")  # \w: Unicode letters, digits and '_', as make_key keeps them


def is_valid_key(key: str) -> bool:
    """Whether `key` may be a sample key (KEY_RULE): a plain file name stem that cannot be a path."""
    return _KEY.fullmatch(key) is not None


def member_key_problem(name: str) -> str | None:
    """Why the tar member `name` cannot belong to a sample (its key breaks KEY_RULE), or None.
    The loader's reader and verify both say it so."""
    key, _ = split_member_name(name)
    if is_valid_key(key):
        return None
    prefix = "; its './' prefix is what `tar -C DIR .` writes" if name.startswith("./") else ""
    return (
        f"member {name!r} has the sample key {key!r}, not a valid key ({KEY_RULE}){prefix}; members are "
        "named KEY.EXT at the top level of the tar, as `python -m salnet.shards pack` writes them"
    )


def member_name(key: str, ext: str) -> str:
    """The tar member name of a sample's member: 'KEY.EXT'."""
    return f"{key}.{ext}"


def split_member_name(name: str) -> tuple[str, str]:
    """(key, ext) of a tar member name, split at its first dot; ext is '' for a name without one."""
    key, _, ext = name.partition(".")
    return key, ext


def sample_meta(
    *, key: str, dataset: str, source: str, mask_source: str, orig_size: Sequence[int], stored_size: Sequence[int]
) -> dict[str, Any]:
    """The content of KEY.json; sizes are (H, W): orig_size upright as found, stored_size as stored."""
    return {
        "key": key,
        "dataset": dataset,
        "source": source,
        "mask_source": mask_source,
        "orig_size": list(orig_size),
        "stored_size": list(stored_size),
    }
