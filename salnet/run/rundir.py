"""The run directory, trusted the way a database is: one writer, nothing half-written mistaken for
whole, nothing outside it touched. `RunDir` is the one place its paths are spelled; this is the one
drawing of its layout (with the RunDir attribute of each entry):

    runs/NAME/                    RunDir(cfg.run_dir)
      .lock                       .lock              held (flock) by rank 0 for the job's life; says who holds it
      config.yaml                 .config            the resolved config of the newest attempt
      metrics.jsonl               .metrics           every logged value, one JSON object per line, each step once
      metrics.replaced.jsonl      .replaced_metrics  rows a resume replaced (the attempt that did not continue)
      checkpoints/                .checkpoints       (salnet.run.checkpoint)
        step-NNNNNNNN/            .checkpoint(N)     complete: the strategy's files, config.json, checksums.json
        .step-NNNNNNNN.tmp/       .partial(N)        a save in progress: never picked for resume
        corrupt-step-NNNNNNNN/    .set_aside(c, why) failed verification at resume: never deleted
        abandoned-step-NNNNNNNN/  .set_aside(c, why) newer than a checkpoint resumed by path: never deleted
                                                     (set aside again: the same name with .2, .3, ...)
      best.pt                     .best              fp32 weights, config and metrics of the best validation
      deepspeed_config.json       .deepspeed_config  the DeepSpeed JSON salnet generated (train.strategy=deepspeed)
      plots/                      .plots             pictures of the run and latest.npz (salnet.run.plots)
      wandb/                      .wandb             W&B's local files (salnet.run.wandb_run)
      slurm/                      .slurm             written by launch/submit.py:
        config-STAMP.yaml         .submitted_config  the resolved config a submitted job runs (its --config)
        wandb_id                  .launcher_wandb_id the W&B run id the launcher writes into each submit's config
                                                     (its own memory: the training never reads it)
        JOB_RANK_log.{out,err}                       each task's log (Submitit names them), and Submitit's pickles

Temporary names (`.NAME.*.tmp` files, `checkpoints/.step-N.tmp/`) are never read as results: a
crash leaves them behind, and rank 0 removes them when the next attempt starts.

Nothing is written outside the run directory: RunLock's holder refuses a directory in which a
symlink leads outside it (`check_contained`), the files written in place (the lock, metrics.jsonl)
are opened with O_NOFOLLOW, and everything else is written atomically (a rename replaces a link,
it never writes through one).

The lock is an flock(2) on `.lock`: the kernel releases it when the holder dies (kill -9
included), so no stale lock outlives a job. On NFS, Linux maps flock to NFS byte-range locks
(NFSv4, or NFSv3 with a lock daemon), which hold across hosts; on a filesystem without locking
(some FUSE mounts, Lustre without `-o flock`) salnet warns that it cannot guarantee one writer.

Torch-free: the launcher and the report use it too.
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
from typing import Any, Literal

from salnet.fsio import atomic_write

log = logging.getLogger("salnet.run.rundir")

_COMPLETE_CHECKPOINT = re.compile(r"^step-(\d{8})$")  # renamed into place only when complete


class RunDirLocked(RuntimeError):
    """Another job holds the run directory."""


class RunDirUnsafe(RuntimeError):
    """A run directory with a file or folder that leads outside it (a symlink salnet would write through)."""


class RunDir:
    """The paths of one run directory (see the module docstring). A RunDir is path-like: everything
    that takes a run directory takes a Path or a RunDir, and `RunDir(run_dir)` accepts either."""

    def __init__(self, root: os.PathLike | str):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- what the training writes ----------------------------------------------------------------

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def replaced_metrics(self) -> Path:
        return self.root / "metrics.replaced.jsonl"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def deepspeed_config(self) -> Path:
        return self.root / "deepspeed_config.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    # ---- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    def partial(self, step: int) -> Path:
        """Where the checkpoint of `step` is written before the rename that completes it."""
        return self.checkpoints / f".step-{step:08d}.tmp"

    @staticmethod
    def set_aside(checkpoint: Path, why: Literal["corrupt", "abandoned"]) -> Path:
        """Move a checkpoint resume must not pick beside it, under a name never read as one; returns
        where it went. A step set aside again (found corrupt again, a second rollback past it) keeps
        every copy: WHY-step-N, then WHY-step-N.2, .3, ..."""
        aside, copy = checkpoint.with_name(f"{why}-{checkpoint.name}"), 1
        while os.path.lexists(aside):  # rename would fail on a full directory, replace an empty one
            copy += 1
            aside = checkpoint.with_name(f"{why}-{checkpoint.name}.{copy}")
        os.rename(checkpoint, aside)
        return aside

    @staticmethod
    def checkpoint_step(path: os.PathLike | str) -> int | None:
        """The step of a complete checkpoint directory's name (step-NNNNNNNN), None for any other name."""
        match = _COMPLETE_CHECKPOINT.match(Path(path).name)
        return int(match[1]) if match else None

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints of the run, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and self.checkpoint_step(p) is not None)

    # ---- what the launcher writes ----------------------------------------------------------------

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    def submitted_config(self, stamp: str) -> Path:
        return self.slurm / f"config-{stamp}.yaml"

    @property
    def launcher_wandb_id(self) -> Path:
        return self.slurm / "wandb_id"

    # ---- leftovers of crashes, start-over --------------------------------------------------------

    def leftovers(self) -> list[Path]:
        """Temporary files and directories of interrupted writes (atomic_write's `.NAME.*.tmp`, saves' `.step-N.tmp/`)."""
        found = list(self.root.glob(".*.tmp")) if self.root.is_dir() else []
        if self.checkpoints.is_dir():
            found += list(self.checkpoints.glob(".*.tmp"))
        return sorted(p for p in found if not p.is_symlink())

    def remove_leftovers(self) -> list[Path]:
        removed = self.leftovers()
        for path in removed:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return removed

    def check_contained(self) -> None:
        """Refuse the run directory if a symlink in it leads outside it: what salnet writes there
        (the lock record, metrics.jsonl, checkpoints/, plots/ ...) would land in files elsewhere.
        Links that stay inside are fine; wandb/ is judged as a whole, not what W&B keeps in it (its
        own links, e.g. to its core log in its cache directory)."""
        root = self.root.resolve()
        for parent, dirs, files in os.walk(self.root):  # not into linked folders: each is judged as a link
            for path in (Path(parent, name) for name in dirs + files):
                if path.is_symlink() and not path.resolve().is_relative_to(root):
                    raise RunDirUnsafe(
                        f"{path}: a symlink to {path.resolve()}, outside the run directory {self.root}; salnet "
                        f"writes only inside it: replace the link with a copy of what it points at, or remove it"
                    )
            if Path(parent) == self.root:
                dirs[:] = [d for d in dirs if d != self.wandb.name]

    def start_over(self) -> list[Path]:
        """train.resume=none: remove what an earlier run wrote here (checkpoints, best.pt, its log), and
        nothing else. A symlink is removed as a link, never followed out of the run directory."""
        removed = []
        for path in (self.checkpoints, self.best, self.metrics, self.replaced_metrics):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)  # rmtree does not follow symlinks inside the tree
            else:
                continue
            removed.append(path)
        return removed


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

    def __init__(self, run_dir: os.PathLike | str):
        run = RunDir(run_dir)
        self.path, self.replaced_path = run.metrics, run.replaced_metrics

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
            with os.fdopen(_open_no_link(self.replaced_path, os.O_WRONLY | os.O_APPEND), "ab") as f:
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
        with os.fdopen(_open_no_link(self.path, os.O_WRONLY | os.O_APPEND), "a") as f:
            f.write(json.dumps(record) + "\n")


def _open_no_link(path: Path, flags: int) -> int:
    """os.open(path, flags | O_CREAT) that refuses a symlink (O_NOFOLLOW) for the files the run
    writes in place rather than atomically (the lock, metrics.jsonl): a link that appeared after
    RunLock's check_contained is refused too, never written through."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise RunDirUnsafe(
            f"{path}: a symlink (to {os.readlink(path)}); salnet writes the run's files only inside the run "
            f"directory: replace the link with a copy of what it points at, or remove it"
        ) from None


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
    """An exclusive flock on runs/NAME/.lock for this process's life (rank 0 takes it). The writer
    that holds it then checks that nothing in the directory leads outside it (RunDir.check_contained)."""

    def __init__(self, run_dir: os.PathLike | str):
        self.run = RunDir(run_dir)
        self.path = self.run.lock
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd: int | None = _open_no_link(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
            os.close(fd)
            fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(
                    f"run directory {self.path.parent} is in use by another job ({holder or 'holder unknown'}); "
                    f"two jobs must not write one run: wait for it, cancel it, or choose another name="
                ) from None
            log.warning(
                f"cannot lock {self.path} ({os.strerror(e.errno)}): this filesystem has no flock, "
                f"so salnet cannot stop a second job from writing the same run directory"
            )
        try:
            self.run.check_contained()  # under the lock: no other salnet job changes the directory meanwhile
        except RunDirUnsafe:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_description()).encode() + b"\n", 0)
            self._fd = fd  # held (and the lock with it) until release() or the process ends

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------------
# Sizes and free space
# --------------------------------------------------------------------------------------------


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
