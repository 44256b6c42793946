"""The run directory, trusted the way a database is: one writer, nothing half-written mistaken for
whole, nothing outside it touched.

    runs/NAME/
      .lock                     held (flock) by rank 0 for the job's life; says who holds it
      config.yaml               the resolved config of the newest attempt
      metrics.jsonl             every logged value, one JSON object per line, each step once
      metrics.replaced.jsonl    rows a resume replaced (the attempt that did not continue)
      checkpoints/step-N/       complete checkpoints (salnet.run.checkpoint), with checksums.json
      checkpoints/corrupt-step-N/, checkpoints/abandoned-step-N/   set aside, never deleted
      best.pt                   the best validation's weights (with a digest of its tensors)

Temporary names (`.NAME.*.tmp` files, `checkpoints/.step-N.tmp/`) are never read as results: a
crash leaves them behind, and rank 0 removes them when the next attempt starts.

The lock is an flock(2) on `.lock`: the kernel releases it when the holder dies (kill -9
included), so no stale lock outlives a job. On NFS, Linux maps flock to NFS byte-range locks
(NFSv4, or NFSv3 with a lock daemon), which hold across hosts; on a filesystem without locking
(some FUSE mounts, Lustre without `-o flock`) salnet warns that it cannot guarantee one writer.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from salnet.fsio import atomic_write

log = logging.getLogger("salnet.run.rundir")

METRICS = "metrics.jsonl"
REPLACED_METRICS = "metrics.replaced.jsonl"
LOCK = ".lock"
COMPLETE_CHECKPOINT = re.compile(r"^step-(\d{8})$")  # checkpoints/step-NNNNNNNN: renamed into place only when complete


class RunDirLocked(RuntimeError):
    """Another job holds the run directory."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (torch-free: launchers and reports use it)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and COMPLETE_CHECKPOINT.match(p.name))


# --------------------------------------------------------------------------------------------
# metrics.jsonl: append-only during a run, cut back to the resumed step on resume
# --------------------------------------------------------------------------------------------


def _split_torn_tail(data: bytes) -> tuple[bytes, bytes]:
    """(complete lines, a torn last line): a crash mid-write leaves a last line without its newline."""
    end = data.rfind(b"\n") + 1
    return data[:end], data[end:]


def read_records(path: os.PathLike | str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is ignored, a bad line
    elsewhere is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    complete, _ = _split_torn_tail(path.read_bytes())
    return [record for record in _parse_lines(complete, path) if record is not None]


class MetricsFile:
    """metrics.jsonl of one run (rank 0 only)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS
        self.replaced_path = Path(run_dir) / REPLACED_METRICS

    def resume_at(self, step: int) -> None:
        """Make the file read as one run up to `step`: cut a torn tail (with a warning), and move
        the rows of later steps (the interrupted attempt's, after its last checkpoint) to the side file."""
        if not self.path.exists():
            return
        complete, torn = _split_torn_tail(self.path.read_bytes())
        if torn:
            log.warning(f"{self.path}: cut a torn last line of {len(torn)} bytes (a crash while it was written)")
        kept, replaced = [], []
        for record, line in zip(_parse_lines(complete, self.path), complete.splitlines(keepends=True)):
            (kept if record is None or record.get("step", 0) <= step else replaced).append(line)
        if replaced:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            with open(self.replaced_path, "ab") as f:
                f.write(json.dumps({"kind": "replaced", "resumed_at_step": step, "time": stamp}).encode() + b"\n")
                f.writelines(replaced)
            log.warning(
                f"{self.path}: {len(replaced)} rows after step {step} (the interrupted attempt's) moved to {self.replaced_path.name}"
            )
        if replaced or torn:
            with atomic_write(self.path, "wb") as f:
                f.writelines(kept)

    def append(self, record: dict[str, Any]) -> None:
        # One write of one whole line: a crash leaves at most a torn last line, which resume cuts.
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _parse_lines(data: bytes, where: Path) -> list[dict | None]:
    """One parsed record (None for a blank line) per line of `data`; a bad line names file and line."""
    out = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            out.append(None)
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, line {number}: not a JSON record ({e.msg}): {line[:80]!r}") from None
    return out


# --------------------------------------------------------------------------------------------
# One writer: the lock
# --------------------------------------------------------------------------------------------


def _holder_description() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


class RunLock:
    """An exclusive flock on runs/NAME/.lock for this process's life (rank 0 takes it)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(
                    f"run directory {self.path.parent} is in use by another job ({holder or 'holder unknown'}); "
                    f"two jobs must not write one run: wait for it, cancel it, or choose another name="
                ) from None
            log.warning(
                f"cannot lock {self.path} ({os.strerror(e.errno)}): this filesystem has no flock, "
                f"so salnet cannot stop a second job from writing the same run directory"
            )
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_description()).encode() + b"\n", 0)
        self._fd = fd  # held (and the lock with it) until release() or the process ends

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------------
# Leftovers of crashes, start-over, free space
# --------------------------------------------------------------------------------------------


def leftovers(run_dir: Path) -> list[Path]:
    """Temporary files and directories of interrupted writes (atomic_write's `.NAME.*.tmp`, saves' `.step-N.tmp/`)."""
    run_dir = Path(run_dir)
    found = list(run_dir.glob(".*.tmp")) if run_dir.is_dir() else []
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        found += list(checkpoints.glob(".*.tmp"))
    return sorted(p for p in found if not p.is_symlink())


def remove_leftovers(run_dir: Path) -> list[Path]:
    removed = leftovers(run_dir)
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return removed


def start_over(run_dir: Path) -> list[Path]:
    """train.resume=none: remove what an earlier run wrote here (checkpoints, best.pt, its log), and
    nothing else. A symlink is removed as a link, never followed out of the run directory."""
    run_dir = Path(run_dir)
    removed = []
    for name in ("checkpoints", "best.pt", METRICS, REPLACED_METRICS):
        path = run_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)  # rmtree does not follow symlinks inside the tree
        else:
            continue
        removed.append(path)
    return removed


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
