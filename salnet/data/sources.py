"""Where shards come from: shard directories and URLs, their manifests, and opening one shard.

A source is written as in `data.train` / `data.val`:

    shards/duts/train                       a local shard directory (or file:///abs/dir)
    https://host/datasets/duts/train        files fetched with curl (webdataset's http handler)
    s3://bucket/duts/train                  files streamed by `aws s3 cp URL -` (webdataset has no s3 handler)
    pipe:ssh host cat /data/duts/train/{}   any command that writes the file named by {} to stdout

Every source must hold `manifest.json` (written last by the packer): its sample counts give the
epoch size without reading the data, and a directory without one is an unfinished pack, refused.
A manifest is checked the same way wherever it comes from (salnet.shards.manifest.check_manifest):
its shard names are plain file names of letters, digits, '.', '-' and '_', so a name read from a
remote manifest can reach a `pipe:` command (or curl's shell) only as the file name it is; it is
also quoted there. `pipe:` itself runs its command with the user's rights: it is for sources the
user trusts, like any command in the config.

`Limits` bound what one shard member may be: its size in the tar (checked from the member's
header by the reader) and its pixel count (checked from the image header before decoding).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import webdataset

from salnet.imagecheck import DEFAULT_MAX_PIXELS
from salnet.shards.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PLAIN_FILE_NAME_RULE,
    ShardsError,
    check_manifest,
    is_plain_file_name,
    load_manifest,
)
from salnet.shards.tario import DEFAULT_MAX_MEMBER_BYTES


class DataError(RuntimeError):
    """A data problem that stops the run; the message names the source, shard or sample at fault."""


@dataclass(frozen=True)
class Limits:
    """What one shard member may be (data.max_member_bytes, data.max_pixels); more is refused before it is read or decoded."""

    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Shard:
    name: str  # how messages name the shard: its path or URL
    url: str  # what webdataset's gopen opens
    samples: int
    limits: Limits = Limits()


@dataclass(frozen=True)
class ShardSet:
    location: str  # as written in the config
    name: str  # the manifest's dataset name
    shards: tuple[Shard, ...]

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


def local_dir(location: str) -> Path | None:
    """The directory of a local source, None for a remote one."""
    if location.startswith("file://"):
        return Path(unquote(urlparse(location).path))
    if location.startswith("pipe:") or "://" in location:
        return None
    return Path(location)


def file_url(location: str, file: str) -> str:
    """The gopen URL of `file` (a shard or the manifest) inside the source `location`.

    `file` must be a plain file name (check_manifest holds every manifest's shard names to that):
    it is put into a command line for pipe: and s3:// (quoted there too), and curl runs through a
    shell, so nothing else may pass."""
    if not is_plain_file_name(file):
        raise DataError(f"source '{location}': {file!r} is not a plain file name ({PLAIN_FILE_NAME_RULE}); refused")
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise DataError(
                f"source '{location}': a pipe: source needs {{}} where the file name goes, "
                "e.g. 'pipe:ssh host cat /data/train/{}'"
            )
        return location.replace("{}", shlex.quote(file))
    if location.startswith("s3://"):
        return f"pipe:aws s3 cp {shlex.quote(location.rstrip('/') + '/' + file)} -"
    directory = local_dir(location)
    if directory is not None:
        return str(directory / file)
    if not location.startswith(("http://", "https://")):
        raise DataError(
            f"source '{location}': unsupported scheme; use a local directory, http(s)://, s3:// or pipe:CMD"
        )
    return location.rstrip("/") + "/" + file


def shard_name(location: str, file: str) -> str:
    return f"{file} (via {location})" if location.startswith("pipe:") else f"{location.rstrip('/')}/{file}"


def open_shard_set(location: str, limits: Limits = Limits()) -> ShardSet:
    """Read the source's manifest; a missing, incomplete or unreadable one stops with the reason."""
    directory = local_dir(location)
    try:
        if directory is not None:
            manifest = load_manifest(directory)  # also checks that every listed shard is there, with its size
        else:
            manifest = _remote_manifest(location)
    except ShardsError as e:
        raise DataError(f"data source '{location}': {e}") from None
    shards = tuple(
        Shard(
            name=shard_name(location, s["file"]), url=file_url(location, s["file"]), samples=s["samples"], limits=limits
        )
        for s in manifest["shards"]
    )
    return ShardSet(location=location, name=manifest["name"], shards=shards)


def _remote_manifest(location: str) -> dict:
    url = file_url(location, MANIFEST_NAME)
    try:
        stream = webdataset.gopen(url, "rb")
        text = stream.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise DataError(
            f"data source '{location}': cannot read its {MANIFEST_NAME} ({url}): {e}; a source without a "
            "manifest is an unfinished pack or a wrong address"
        ) from None
    too_big = len(text) > MAX_MANIFEST_BYTES
    try:
        stream.close()  # a curl or pipe: process cut short by a refusal exits non-zero; that is not the problem then
    except OSError as e:
        if not too_big:
            raise DataError(f"data source '{location}': cannot read its {MANIFEST_NAME} ({url}): {e}") from None
    if too_big:
        raise DataError(
            f"data source '{location}': {MANIFEST_NAME} ({url}) is larger than {MAX_MANIFEST_BYTES} bytes; "
            "not a salnet manifest (refused without reading the rest)"
        )
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise DataError(
            f"data source '{location}': {MANIFEST_NAME} ({url}) is not JSON ({e}); got {len(text)} bytes"
        ) from None
    check_manifest(manifest, url)
    return manifest


def open_shard(shard: Shard):
    """A readable byte stream of the shard's tar (a file, or the stdout of curl / aws / a pipe: command)."""
    try:
        return webdataset.gopen(shard.url, "rb")
    except OSError as e:
        raise DataError(f"shard {shard.name}: cannot open it: {e}") from None
