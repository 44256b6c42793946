"""Where shards come from: shard directories and URLs, their manifests, and opening one shard.

A source is written as in `data.train` / `data.val`:

    shards/duts/train                       a local shard directory (or file:///abs/dir)
    https://host/datasets/duts/train        files fetched with curl (webdataset's http handler)
    s3://bucket/duts/train                  files streamed by `aws s3 cp URL -` (webdataset has no s3 handler)
    pipe:ssh host cat /data/duts/train/{}   any command that writes the file named by {} to stdout

Every source must hold `manifest.json` (written last by the packer): its sample counts give the
epoch size without reading the data, and a directory without one is an unfinished pack, refused.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import webdataset

from salnet.shards.manifest import MANIFEST_NAME, ShardsError, check_manifest, load_manifest


class DataError(RuntimeError):
    """A data problem that stops the run; the message names the source, shard or sample at fault."""


@dataclass(frozen=True)
class Shard:
    name: str  # how messages name the shard: its path or URL
    url: str  # what webdataset's gopen opens
    samples: int


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
    """The gopen URL of `file` (a shard or the manifest) inside the source `location`."""
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise DataError(f"source '{location}': a pipe: source needs {{}} where the file name goes, "
                            "e.g. 'pipe:ssh host cat /data/train/{}'")
        return location.replace("{}", shlex.quote(file))
    if location.startswith("s3://"):
        return f"pipe:aws s3 cp {shlex.quote(location.rstrip('/') + '/' + file)} -"
    directory = local_dir(location)
    if directory is not None:
        return str(directory / file)
    if not location.startswith(("http://", "https://")):
        raise DataError(f"source '{location}': unsupported scheme; use a local directory, http(s)://, s3:// or pipe:CMD")
    return location.rstrip("/") + "/" + file


def shard_name(location: str, file: str) -> str:
    return f"{file} (via {location})" if location.startswith("pipe:") else f"{location.rstrip('/')}/{file}"


def open_shard_set(location: str) -> ShardSet:
    """Read the source's manifest; a missing, incomplete or unreadable one stops with the reason."""
    directory = local_dir(location)
    try:
        if directory is not None:
            manifest = load_manifest(directory)  # also checks that every listed shard is there, with its size
        else:
            manifest = _remote_manifest(location)
    except ShardsError as e:
        raise DataError(f"data source '{location}': {e}") from None
    shards = tuple(Shard(name=shard_name(location, s["file"]), url=file_url(location, s["file"]), samples=s["samples"])
                   for s in manifest["shards"])
    return ShardSet(location=location, name=manifest["name"], shards=shards)


def _remote_manifest(location: str) -> dict:
    url = file_url(location, MANIFEST_NAME)
    try:
        with webdataset.gopen(url, "rb") as stream:
            text = stream.read()
    except OSError as e:
        raise DataError(f"data source '{location}': cannot read its {MANIFEST_NAME} ({url}): {e}; a source without a "
                        "manifest is an unfinished pack or a wrong address") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise DataError(f"data source '{location}': {MANIFEST_NAME} ({url}) is not JSON ({e}); got {len(text)} bytes") from None
    check_manifest(manifest, url)
    return manifest


def open_shard(shard: Shard):
    """A readable byte stream of the shard's tar (a file, or the stdout of curl / aws / a pipe: command)."""
    try:
        return webdataset.gopen(shard.url, "rb")
    except OSError as e:
        raise DataError(f"shard {shard.name}: cannot open it: {e}") from None
