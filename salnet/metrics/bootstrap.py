"""95 % bootstrap intervals over images and paired permutation tests between methods, from `PerImage` rows.

Every dataset metric is a function of means over images of per-image quantities (`PerImage`):
plain means (S, MAE, adpF, ...) and summaries of mean curves (maxF = the max over thresholds of the
mean F curve). Both the interval and the test recompute those means for many reweightings of the
images at once, as one matrix product each, and then the metric from the reweighted means exactly
as `SODMetrics.compute()` does (`per_image.summarise`): maxF of a resample is the max of that
resample's mean curve, never a mean of per-image maxima.

- Interval: the percentile bootstrap. Resample r draws the dataset's n images n times with
  replacement; `counts[r, i]` is how often image i was drawn, so the resampled means are
  `counts @ rows / n`. The interval is the (2.5 %, 97.5 %) quantiles of the R resampled values.
  All the methods of a dataset (on the same images) share the same resamples.
- Paired test (`TEST`): for methods A and B on the same images, the null hypothesis is that on
  each image the two methods' rows are exchangeable (the labels A and B could be swapped without
  changing the distribution). A permutation swaps the pair on a random subset of images,
  `swaps[r, i]` in {0, 1}: the swapped means are mean_A + swaps @ (B - A) / n and
  mean_B - swaps @ (B - A) / n, one matrix product for both, and the statistic is the metric's
  difference |metric(A') - metric(B')|. Why this rather than a paired bootstrap: a permutation test
  is valid at any sample size for any statistic, a max over thresholds of mean curves included
  (the bootstrap test of a max needs a recentring that has no exact form), and it needs no
  assumption beyond the exchangeability it tests. p = (1 + #{|T_perm| >= |T_observed|}) / (R + 1),
  two-sided: the usual +1 counts the observed labelling as one of the permutations, so p is never 0.
  Identical methods give p = 1.

Seeded: the draws depend only on (seed, number of images), so the same seed gives the same
intervals and p-values. Vectorised in torch float64; no Python loop over resamples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from salnet.metrics.per_image import PerImage, needed_fields, summarise

LEVEL = 0.95
TEST = "paired permutation test (two-sided, per-image swaps of the two methods' rows; p = (1 + hits) / (R + 1))"
INTERVAL = "percentile"
# |T_perm| >= |T_obs| is counted with this relative slack, so that a permutation whose statistic
# equals the observed one up to float64 rounding of the matrix product counts as a tie (a hit).
_TIE_TOLERANCE = 1e-9


@dataclass
class Uncertainty:
    """One dataset's intervals and p-values: `intervals[method][metric] = (lo, hi)`,
    `p_values[method][metric][other] = p` (the same for (other, method))."""

    resamples: int
    seed: int
    level: float
    intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    p_values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


class Draws:
    """The resample counts and the permutation swaps for n images, seeded by (seed, n) and cached."""

    def __init__(self, resamples: int, seed: int):
        self.resamples, self.seed = resamples, seed
        self._counts: dict[int, torch.Tensor] = {}
        self._swaps: dict[int, torch.Tensor] = {}

    def _generator(self, n: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + n * 2 + stream)

    def counts(self, n: int) -> torch.Tensor:
        """float64 [R, n]: how often each image is drawn in each resample (every row sums to n)."""
        if n not in self._counts:
            drawn = torch.randint(n, (self.resamples, n), generator=self._generator(n, 0))
            counts = torch.zeros(self.resamples, n, dtype=torch.float64)
            self._counts[n] = counts.scatter_add_(1, drawn, torch.ones(drawn.shape, dtype=torch.float64))
        return self._counts[n]

    def swaps(self, n: int) -> torch.Tensor:
        """float64 [R, n] of 0 / 1: which images swap the two methods' rows in each permutation."""
        if n not in self._swaps:
            bits = torch.randint(2, (self.resamples, n), generator=self._generator(n, 1))
            self._swaps[n] = bits.to(torch.float64)
        return self._swaps[n]


def field_matrix(rows: PerImage, fields: list[str], index: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """float64 [n, D]: the fields' per-image values side by side, and each field's (name, columns)."""
    parts, layout, start = [], [], 0
    for name in fields:
        value = torch.from_numpy(rows.values[name]).to(torch.float64)
        value = value if index is None else value[index]
        value = value.view(value.shape[0], -1)
        parts.append(value)
        layout.append((name, slice(start, start + value.shape[1]), rows.values[name].ndim > 1))
        start += value.shape[1]
    return torch.cat(parts, 1), layout


def metrics_of_means(means: torch.Tensor, layout: list, families) -> dict[str, torch.Tensor]:
    """The dataset metrics of each row of `means` [R, D] (or of the one row [D])."""
    split = {name: means[..., where] if curve else means[..., where.start] for name, where, curve in layout}
    return summarise(split, families)


def _check_same(per_method: Mapping[str, PerImage]) -> tuple[str, ...]:
    families = {rows.families for rows in per_method.values()}
    if len(families) > 1:
        raise ValueError(f"the methods were scored with different metric families: {sorted(families)}")
    (only,) = families
    return only


def intervals(rows: PerImage, draws: Draws, level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Each metric's percentile interval for one method's images."""
    fields = needed_fields(rows.families)
    x, layout = field_matrix(rows, fields)
    n = x.shape[0]
    resampled = metrics_of_means(draws.counts(n) @ x / n, layout, rows.families)
    quantiles = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return {name: tuple(torch.quantile(values, quantiles).tolist()) for name, values in resampled.items()}


def paired_p_values(a: PerImage, b: PerImage, draws: Draws) -> dict[str, float]:
    """Each metric's two-sided permutation p-value for A against B on the images both were scored
    on (all of them, unless --allow-missing left some out of one method)."""
    families = _check_same({"a": a, "b": b})
    common = set(a.keys) & set(b.keys)
    if not common:
        raise ValueError("the two methods share no image: a paired test needs the same images")
    index_a, index_b = (
        None if len(common) == len(rows) else torch.tensor([i for i, k in enumerate(rows.keys) if k in common])
        for rows in (a, b)
    )
    fields = needed_fields(families)
    xa, layout = field_matrix(a, fields, index_a)
    xb, _ = field_matrix(b, fields, index_b)
    n = xa.shape[0]
    mean_a, mean_b = xa.mean(0), xb.mean(0)
    shift = draws.swaps(n) @ (xb - xa) / n
    swapped_a, swapped_b = (
        metrics_of_means(mean_a + shift, layout, families),
        metrics_of_means(mean_b - shift, layout, families),
    )
    observed_a, observed_b = metrics_of_means(mean_a, layout, families), metrics_of_means(mean_b, layout, families)
    out = {}
    for name in swapped_a:
        observed = (observed_a[name] - observed_b[name]).abs()
        permuted = (swapped_a[name] - swapped_b[name]).abs()
        hits = (permuted >= observed - _TIE_TOLERANCE * max(1.0, observed.item())).sum().item()
        out[name] = (1 + hits) / (draws.resamples + 1)
    return out


def bootstrap(
    per_method: Mapping[str, PerImage], resamples: int = 1000, seed: int = 0, level: float = LEVEL
) -> Uncertainty:
    """One dataset's intervals for every method and p-values for every pair of methods that share
    images (two methods scored on disjoint images, which only --allow-missing allows, get none)."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    _check_same(per_method)
    draws = Draws(resamples, seed)
    result = Uncertainty(resamples, seed, level)
    for method, rows in per_method.items():
        result.intervals[method] = intervals(rows, draws, level)
        result.p_values[method] = {}
    methods = list(per_method)
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            if set(per_method[a].keys).isdisjoint(per_method[b].keys):
                continue
            for name, p in paired_p_values(per_method[a], per_method[b], draws).items():
                result.p_values[a].setdefault(name, {})[b] = p
                result.p_values[b].setdefault(name, {})[a] = p
    return result
