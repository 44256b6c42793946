"""The names of the metrics, their families and which way is better: the one list everyone reads.

Pure Python on purpose: `salnet.config` checks `eval.best_metric` against `eval.metrics` with it
when a config loads, before torch is imported.
"""

from __future__ import annotations

from collections.abc import Iterable

# The families SODMetrics computes, in its order, and the values each one reports.
FAMILY_METRICS: dict[str, tuple[str, ...]] = {
    "F": ("maxF", "meanF", "adpF"),
    "E": ("maxE", "meanE", "adpE"),
    "S": ("S",),
    "wF": ("wF",),
    "MAE": ("MAE",),
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_METRICS)
METRICS: tuple[str, ...] = tuple(name for names in FAMILY_METRICS.values() for name in names)
LOWER_IS_BETTER = frozenset({"MAE"})


def metric_names(families: Iterable[str]) -> list[str]:
    """The values `SODMetrics(families).compute()` returns, in its order."""
    chosen = set(families)
    return [name for family in FAMILIES if family in chosen for name in FAMILY_METRICS[family]]


def is_better(metric: str, value: float, than: float | None) -> bool:
    """Whether `value` of `metric` beats `than` (None: nothing to beat yet)."""
    if than is None:
        return True
    return value < than if metric in LOWER_IS_BETTER else value > than
