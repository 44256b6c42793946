"""Checksums that let a checkpoint prove it is intact, and the one way its files are read back.

Every file of a checkpoint is listed in its `checksums.json` (size and 128-bit XXH3 hash), written
into the temporary directory before the atomic rename, so a complete checkpoint always carries it;
verification refuses a file it does not list as it refuses a wrong checksum.
Files salnet writes itself are hashed while they are written (`save_hashed`), so saving reads
nothing back; files DeepSpeed writes are hashed once after writing, by the rank that wrote them.

XXH3 rather than SHA-256: the threat is accidental (a bad disk, a copy cut short, a sync tool that
patches bytes), which a 128-bit non-cryptographic hash catches as surely, at ~6 GiB/s instead of
~1 GiB/s on one core here (`python -m salnet.bench checkpoint` measures what it adds to a save).
Malicious files are the business of weights-only loading (`load_file`, which every reader of a
checkpoint or best.pt goes through), not of these checksums.

best.pt is one file that training replaces atomically; it carries a digest of its own tensors
(`tensor_digest`) and of its config and metrics (salnet.run.checkpoint), checked whenever it is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from salnet.fsio import atomic_write

MANIFEST = "checksums.json"
ALGORITHM = "xxh3_128"
_CHUNK = 4 << 20


class CheckpointCorrupt(RuntimeError):
    """A checkpoint (or best.pt) that is not what was written: the message names the file and why."""


@dataclass(frozen=True)
class FileDigest:
    size: int
    xxh3_128: str


class _HashingWriter:
    """A binary file that hashes and counts what goes through it (torch.save writes into it)."""

    def __init__(self, f):
        self._f, self._hash, self.size = f, xxhash.xxh3_128(), 0
        self.error: OSError | None = None  # torch's writer reports a failed write only as a position mismatch

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += len(view)
        try:
            return self._f.write(view)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()

    def digest(self) -> FileDigest:
        return FileDigest(self.size, self._hash.hexdigest())


def save_hashed(obj: Any, path: Path) -> FileDigest:
    """torch.save(obj, path), returning the digest of the bytes written (computed on the way out)."""
    writer = None
    try:
        with open(path, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            writer.flush()
    except Exception as e:
        cause = writer.error if writer is not None and writer.error is not None else e
        raise OSError(getattr(cause, "errno", None) or 0, f"{path}: {getattr(cause, 'strerror', None) or cause}") from e
    return writer.digest()


def file_digest(path: Path) -> FileDigest:
    h, size = xxhash.xxh3_128(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileDigest(size, h.hexdigest())


def write_manifest(directory: Path, digests: dict[str, FileDigest]) -> None:
    with atomic_write(directory / MANIFEST) as f:
        json.dump(
            {"algorithm": ALGORITHM, "files": {name: asdict(d) for name, d in sorted(digests.items())}}, f, indent=1
        )


def verify(directory: Path) -> None:
    """Raise CheckpointCorrupt naming the first file that is missing, has the wrong size or checksum,
    or is not listed, or the manifest itself when it is missing, unreadable or lists nothing.

    The manifest must cover the directory exactly: a loader reads files by name, so a file the
    manifest does not list (an emptied or cut-short checksums.json) would be loaded unverified."""
    manifest = directory / MANIFEST
    try:
        content = json.loads(manifest.read_text())
        files, algorithm = content["files"], content["algorithm"]
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{manifest}: missing (an incomplete or foreign checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorrupt(f"{manifest}: unreadable ({e})") from None
    if algorithm != ALGORITHM:
        raise CheckpointCorrupt(
            f"{manifest}: algorithm {algorithm!r} is not {ALGORITHM!r} (written by another version of salnet?)"
        )
    if not isinstance(files, dict) or not files:
        raise CheckpointCorrupt(f"{manifest}: lists no files (emptied after it was written?)")
    present = _entries(directory)
    for name in sorted(present):  # before reading any: a symlink would lead the hashing outside
        path = directory / name
        if path.is_symlink():
            raise CheckpointCorrupt(f"{path}: a symlink (a checkpoint holds only the files its save wrote)")
        if name not in files and name != MANIFEST:
            raise CheckpointCorrupt(
                f"{path}: not listed in {manifest} (every file of a checkpoint must be listed and verified)"
            )
    for name, expected in files.items():
        path = directory / name
        if name not in present:
            raise CheckpointCorrupt(f"{path}: missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointCorrupt(f"{path}: {size} bytes, {expected['size']} were written")
        if file_digest(path).xxh3_128 != expected[ALGORITHM]:
            raise CheckpointCorrupt(f"{path}: checksum mismatch (its bytes changed after it was written)")


def _entries(directory: Path) -> set[str]:
    """Every file and symlink under `directory`, as manifest names; symlinks are not followed."""
    found = set()
    for root, dirs, names in os.walk(directory):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(Path(root, name).relative_to(directory).as_posix())
    return found


def load_file(path: Path, map_location=None, safe_globals: tuple = ()) -> Any:
    """torch.load with weights_only=True; any failure is an error that names the file."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the checkpoint") from None
    except Exception as e:
        raise RuntimeError(
            f"{path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """XXH3-128 over the names, dtypes, shapes and bytes of a state dict's tensors (CPU)."""
    h = xxhash.xxh3_128()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
