"""manifest.json: what a shard directory holds, and the proof that it is complete.

The manifest is written last, through a temporary name and a rename, so a directory with a valid
manifest.json is a finished dataset and one without it is not (an interrupted or failed pack).
Every reader goes through `load_manifest`, which refuses the latter with a message that says so.

`check_manifest` (used by `load_manifest` and for remote manifests alike) holds a manifest to
what readers rely on: at least one shard; each named once, by a plain file name (letters,
digits, '.', '-', '_'; no path, no leading '.' or '-'), so that a name can neither leave the
shard directory nor mean anything to a shell; counts and sizes that are whole numbers in range
and add up to the totals; and `skipped` entries with a path and a reason.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from salnet.fsio import fsync_dir

FORMAT = "salnet-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"

# key -> type of every top-level field a reader may rely on.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "version": int,
    "name": str,
    "layout": str,
    "command": str,
    "salnet_version": str,
    "shards": list,
    "total_samples": int,
    "total_bytes": int,
    "stats": dict,
    "skipped": list,
}
SHARD_FIELDS: dict[str, type] = {"file": str, "samples": int, "bytes": int, "sha256": str}
SKIPPED_FIELDS: dict[str, type] = {"path": str, "reason": str}
PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
PLAIN_FILE_NAME_RULE = "letters, digits, '.', '-' and '_', not starting with '.' or '-'"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST_BYTES = 64 * 2**20  # a manifest of 100,000 shards is about 20 MB


class ShardsError(ValueError):
    """A problem with a dataset, its files or the options; the message names what and how to fix it."""


class ManifestError(ShardsError):
    """The directory is not a complete, readable salnet shard set; the message says why."""


def load_manifest(shard_dir: os.PathLike | str) -> dict[str, Any]:
    """Read and check `shard_dir/manifest.json`; every shard it lists must exist with its size.

    Hashes are not checked here (that reads every byte: `python -m salnet.shards verify`).
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    for shard in manifest["shards"]:
        file = shard_dir / shard["file"]
        if not file.is_file():
            raise ManifestError(
                f"'{shard_dir / MANIFEST_NAME}' lists shard '{shard['file']}', which is missing from '{shard_dir}'"
            )
        if file.stat().st_size != shard["bytes"]:
            raise ManifestError(
                f"shard '{file}' has {file.stat().st_size} bytes, the manifest says {shard['bytes']} "
                "(truncated or replaced; run `python -m salnet.shards verify`)"
            )
    return manifest


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    """The manifest, structurally checked; the shard files themselves are not looked at."""
    path = shard_dir / MANIFEST_NAME
    if not shard_dir.is_dir():
        raise ManifestError(
            f"shard directory '{shard_dir}' does not exist (make one with `python -m salnet.shards pack` or `synth`)"
        )
    if not path.is_file():
        raise ManifestError(
            f"'{shard_dir}' is not a complete shard directory: it has no {MANIFEST_NAME} "
            "(a pack writes it last, so the pack there failed, was interrupted, or never ran; "
            "re-run `python -m salnet.shards pack ... --overwrite`)"
        )
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"'{path}' is {path.stat().st_size} bytes, larger than any salnet manifest "
            f"({MAX_MANIFEST_BYTES} bytes at most); not read"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"'{path}' is not valid JSON ({e})") from None
    check_manifest(manifest, path)
    return manifest


def is_plain_file_name(name: str) -> bool:
    """A name that stays inside its directory and means nothing to a shell (PLAIN_FILE_NAME_RULE)."""
    return PLAIN_FILE_NAME.fullmatch(name) is not None


def check_manifest(manifest: Any, where: os.PathLike | str) -> None:
    """Structure and consistency only: fields, types, ranges, shard file names and the totals."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"'{where}' must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ManifestError(
            f"'{where}' is not a salnet shard manifest: \"format\" is {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    if manifest.get("version") != VERSION:
        raise ManifestError(
            f"'{where}' has manifest version {manifest.get('version')!r}; this salnet reads version {VERSION}"
        )
    _check_fields(manifest, REQUIRED_FIELDS, f"'{where}'")
    if not manifest["shards"]:
        raise ManifestError(f"'{where}' lists no shards; a shard set holds at least one (re-run the pack)")
    first_listed: dict[str, int] = {}
    for i, shard in enumerate(manifest["shards"]):
        _check_fields(shard, SHARD_FIELDS, f"'{where}' shards[{i}]")
        file = shard["file"]
        if not is_plain_file_name(file) or not file.endswith(".tar"):
            raise ManifestError(
                f"'{where}' shards[{i}].file must be a plain .tar file name in the shard directory "
                f"({PLAIN_FILE_NAME_RULE}), got {file!r}"
            )
        if file in first_listed:
            raise ManifestError(
                f"'{where}' lists shard '{file}' twice (shards[{first_listed[file]}] and shards[{i}]); "
                "each shard is read once per epoch, so it must be listed once"
            )
        first_listed[file] = i
        if shard["samples"] < 1 or shard["bytes"] < 0:
            raise ManifestError(
                f"'{where}' shards[{i}] ('{file}'): \"samples\" must be at least 1 and \"bytes\" at least 0, "
                f"got {shard['samples']} and {shard['bytes']}"
            )
        if not SHA256_HEX.fullmatch(shard["sha256"]):
            raise ManifestError(
                f"'{where}' shards[{i}] ('{file}'): \"sha256\" must be 64 lowercase hex digits, got {shard['sha256']!r}"
            )
    samples = sum(s["samples"] for s in manifest["shards"])
    if samples != manifest["total_samples"]:
        raise ManifestError(f"'{where}': total_samples is {manifest['total_samples']} but the shards hold {samples}")
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    if total_bytes != manifest["total_bytes"]:
        raise ManifestError(
            f"'{where}': total_bytes is {manifest['total_bytes']} but the shards' bytes add up to {total_bytes}"
        )
    for i, entry in enumerate(manifest["skipped"]):
        _check_fields(entry, SKIPPED_FIELDS, f"'{where}' skipped[{i}]")


def _check_fields(obj: Any, fields: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where} must be a JSON object, got {type(obj).__name__}")
    for key, kind in fields.items():
        if key not in obj:
            raise ManifestError(f'{where} lacks the field "{key}"')
        # bool is an int in Python; a count of true is still a broken manifest.
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise ManifestError(f'{where}: "{key}" must be {getattr(kind, "__name__", kind)}, got {obj[key]!r}')


def write_manifest(shard_dir: Path, manifest: dict[str, Any]) -> Path:
    """Atomically write the manifest: temporary file, fsync, rename, fsync the directory."""
    check_manifest(manifest, shard_dir / MANIFEST_NAME)
    path = shard_dir / MANIFEST_NAME
    # A fixed temporary name (not a random one) so that `pack --overwrite` recognises the debris of
    # a killed pack as its own.
    tmp = shard_dir / (MANIFEST_NAME + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(shard_dir)
    return path
