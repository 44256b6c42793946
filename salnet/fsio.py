"""Atomic file writes: what a reader finds under a final name is always complete.

A write goes to a temporary file in the same directory, is flushed and fsynced, renamed over the
final name (atomic on POSIX), and the directory is fsynced so the rename itself survives a crash.
Pure Python on purpose: `salnet.config` uses it and must not import torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: os.PathLike | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    # Read from /proc where Linux shows it: setting it to read it would, for that instant, give a
    # file another thread creates (the plots thread, during a save) the mode 0666.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def umask_mode(executable: bool = False) -> int:
    """The mode a file created now gets from a plain open(): 0666 less the umask (0777 for an executable)."""
    return (0o777 if executable else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_write(path: os.PathLike | str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """`with atomic_write(p) as f: f.write(...)`; on an error the final name is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            # mkstemp creates 0600: give the file the mode a plain open() would (0666 less the umask).
            os.fchmod(f.fileno(), umask_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
