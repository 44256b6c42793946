"""What the benchmarks share: their argument parser, interleaved repeats, medians, ratios, the JSON line.

Private (the leading underscore keeps it out of `python -m salnet.bench`'s list of benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from salnet.shards.parallel import available_cpus

T = TypeVar("T")


def parser(
    name: str, description: str, *, repeats: int = 3, samples: tuple[int, str] | None = None, workers: str | None = None
) -> argparse.ArgumentParser:
    """The parser of `python -m salnet.bench NAME`, with --repeats; `samples=(default, what they are)`
    adds --samples and `workers="what they do"` adds --workers (default 2), for the benchmarks that
    make a data set and run it through worker processes."""
    p = argparse.ArgumentParser(
        prog=f"python -m salnet.bench {name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if samples is not None:
        p.add_argument("--samples", type=int, default=samples[0], help=f"{samples[1]} (default {samples[0]})")
    if workers is not None:
        p.add_argument("--workers", type=int, default=2, help=f"{workers} (default 2)")
    p.add_argument(
        "--repeats", type=int, default=repeats, help=f"timed repeats; medians are reported (default {repeats})"
    )
    return p


def interleaved(
    repeats: int, contenders: Mapping[str, Callable[[int], T]], describe: Callable[[dict[str, T]], str] | None = None
) -> dict[str, list[T]]:
    """Every contender's results, one per repeat: each is called with the repeat's number, and the
    contenders alternate within a repeat, so a drift in the machine's load hits all of them alike.
    With `describe`, each repeat's results are also printed to stderr as they come."""
    results: dict[str, list[T]] = {name: [] for name in contenders}
    for repeat in range(repeats):
        for name, run in contenders.items():
            results[name].append(run(repeat))
        if describe is not None:
            print(
                f"repeat {repeat + 1}/{repeats}: " + describe({name: values[-1] for name, values in results.items()}),
                file=sys.stderr,
                flush=True,
            )
    return results


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), wall-clock seconds it took)."""
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def medians(results: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in results.items()}


def ratio(numerator: float, denominator: float) -> float:
    """A ratio as the JSON line reports it: three decimals."""
    return round(numerator / denominator, 3)


def machine() -> dict[str, Any]:
    """What a throughput figure depends on besides the code: the CPUs this process may use, and the
    load their neighbours put on them (the 1-minute load average)."""
    return {"cpus": available_cpus(), "loadavg_1m": round(os.getloadavg()[0], 2)}


def emit(result: dict[str, Any]) -> None:
    """The benchmark's last line: one JSON object with every figure."""
    print(json.dumps(result), flush=True)
