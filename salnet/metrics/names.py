"""The names of the metrics, their families and which way is better: the one list everyone reads.

Pure Python on purpose: `salnet.config` checks `eval.best_metric` against `eval.metrics` with it
when a config loads, before torch is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

# The families SODMetrics computes, in its order, and the values each one reports. A name that
# starts with max or mean is that summary of a per-threshold curve averaged over images.
FAMILY_METRICS: dict[str, tuple[str, ...]] = {
    "F": ("maxF", "meanF", "adpF"),
    "E": ("maxE", "meanE", "adpE"),
    "S": ("S",),
    "wF": ("wF",),
    "MAE": ("MAE",),
    # PySODMetrics' other families (opt-in: the standard SOD tables above stay as they are).
    "IoU": ("maxIoU", "meanIoU", "adpIoU"),
    "Dice": ("maxDice", "meanDice", "adpDice"),
    "BER": ("maxBER", "meanBER", "adpBER"),
    "MSIoU": ("maxMSIoU", "meanMSIoU", "adpMSIoU"),
    "SI-MAE": ("SI-MAE",),
    # Per image the mean over its objects of each object's max / mean / adaptive F: not summaries
    # of one mean curve, hence not named max... / mean...
    "SI-F": ("SI-maxF", "SI-meanF", "SI-adpF"),
    "HCE": ("HCE",),
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_METRICS)
# What salnet.evaluate computes without --metrics: the families of a standard SOD table.
DEFAULT_FAMILIES: tuple[str, ...] = ("F", "E", "S", "wF", "MAE")
METRICS: tuple[str, ...] = tuple(name for names in FAMILY_METRICS.values() for name in names)
# maxBER is the toolkits' max over thresholds, i.e. the worst threshold's BER.
LOWER_IS_BETTER = frozenset({"MAE", "maxBER", "meanBER", "adpBER", "SI-MAE", "HCE"})
# Families that need a package salnet does not require: (module, what to pip install, salnet's extra).
FAMILY_PACKAGES = {"HCE": ("skimage", "scikit-image", "hce")}


class MissingPackageError(ImportError):
    """A chosen metric family needs a package that is not installed."""


def check_packages(families: Iterable[str]) -> None:
    """Raise `MissingPackageError` naming the package when a chosen family cannot run."""
    for family in families:
        if family in FAMILY_PACKAGES:
            module, package, extra = FAMILY_PACKAGES[family]
            try:
                importlib.import_module(module)
            except ImportError:
                raise MissingPackageError(
                    f"the {family} metric needs {package}, which is not installed: pip install {package} "
                    f"(or salnet[{extra}])"
                ) from None


def metric_names(families: Iterable[str]) -> list[str]:
    """The values `SODMetrics(families).compute()` returns, in its order."""
    chosen = set(families)
    return [name for family in FAMILIES if family in chosen for name in FAMILY_METRICS[family]]


def is_better(metric: str, value: float, than: float | None) -> bool:
    """Whether `value` of `metric` beats `than` (None: nothing to beat yet)."""
    if than is None:
        return True
    return value < than if metric in LOWER_IS_BETTER else value > than
