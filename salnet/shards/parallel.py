"""Ordered parallel map with a progress bar, shared by pack, synth and verify; the CPU count, and
the most worker processes salnet starts on it.

Results come back in input order whatever the number of workers, which is what makes a pack
byte-identical between `--workers 1` and `--workers 8`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count).

    The one CPU count in salnet: the shards commands' default --workers, the loader's default
    workers (salnet.data.default_workers) and the benchmarks all use it; this module imports no torch.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# A worker is a process of its own (a loader worker also holds a copy of its dataset and a
# prefetch queue): beyond a few per CPU more of them only cost memory and start-up time, and a
# count far above that is a typo or a setting meant for another machine, which would start
# hundreds of processes. More than one per CPU is allowed for readers that wait on remote shards.
WORKERS_PER_CPU = 4


def too_many_workers(workers: int) -> str | None:
    """Why `workers` worker processes are refused on this machine, or None. The one rule for every
    process count a user sets: the shards commands' --workers and the loaders' (data.workers,
    predict's and evaluate's --workers)."""
    cpus = available_cpus()
    if workers <= WORKERS_PER_CPU * cpus:
        return None
    return (
        f"{workers} worker processes are far above the {cpus} CPUs this process may use: at most "
        f"{WORKERS_PER_CPU * cpus} ({WORKERS_PER_CPU} per CPU) are started"
    )


def ordered_map(
    fn: Callable[[T], R], items: list[T], workers: int, desc: str, unit: str = "sample", progress: bool | None = None
) -> Iterator[R]:
    """Yield fn(item) for each item, in order, on `workers` processes (1: in this process).

    `progress=None` shows the bar only on a terminal, so logs and tests stay clean.
    """
    bar = tqdm(
        total=len(items),
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
    )
    with bar:
        if workers <= 1 or len(items) <= 1:
            yield from _counted(map(fn, items), bar)
            return
        # Chunks small enough to keep both the bar and the writer moving, big enough to amortise IPC.
        chunksize = max(1, min(32, len(items) // (workers * 8)))
        with multiprocessing.get_context().Pool(workers) as pool:
            yield from _counted(pool.imap(fn, items, chunksize=chunksize), bar)


def _counted(results: Iterable[R], bar: tqdm) -> Iterator[R]:
    for result in results:
        bar.update(1)
        yield result
