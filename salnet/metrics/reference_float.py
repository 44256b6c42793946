"""numpy's float64 mean of a constant block, rounding included, for the S-measure's one float-equality test.

PySODMetrics' ssim of a quadrant whose GT and prediction are both uniform is 1 when the
prediction's variance is exactly 0 and 0 otherwise; the variance is exactly 0 only when numpy's
`np.mean` of the block returns the constant itself, which depends on how numpy summed it. A
constant prediction (an untrained network, a saturated map) meets this on every quadrant that
the GT covers or misses entirely, so reproducing the reference there means reproducing numpy's
summation order. Verified against the installed numpy by tests/test_metrics.py.

numpy 2.x (checked on 2.3) sums float64 with `pairwise_sum`: below 8 elements one running sum, up to
128 elements eight interleaved running sums combined as a tree, above that two halves (the first
a multiple of 8). A contiguous block is one such sum. A block cut out of wider rows is fed through
the iterator's buffer: whole rows at a time, as many as fit in `np.getbufsize()` elements (at
least one), each chunk pairwise-summed and added to a running total.
"""

from __future__ import annotations

import functools

import numpy as np


def numpy_mean_of_constant_block(value: float, rows: int, cols: int, row_length: int) -> float:
    """`np.mean(a[r0:r0 + rows, c0:c0 + cols])` where every element of the C-contiguous float64
    array `a` (rows of `row_length`) in the block equals `value`."""
    count = rows * cols
    if cols == row_length or rows == 1:
        return _pairwise_sum_of_constant(value, count) / count
    chunk = max(np.getbufsize() // cols, 1) * cols
    total = 0.0
    for start in range(0, count, chunk):
        total += _pairwise_sum_of_constant(value, min(chunk, count - start))
    return total / count


@functools.lru_cache(maxsize=4096)  # the recursion meets few distinct sizes
def _pairwise_sum_of_constant(value: float, n: int) -> float:
    if n < 8:
        total = 0.0
        for _ in range(n):
            total += value
        return total
    if n <= 128:
        lane = value  # each of the 8 lanes starts at one element and adds n // 8 - 1 more
        for _ in range(n // 8 - 1):
            lane += value
        total = ((lane + lane) + (lane + lane)) + ((lane + lane) + (lane + lane))
        for _ in range(n % 8):
            total += value
        return total
    half = n // 2
    half -= half % 8
    return _pairwise_sum_of_constant(value, half) + _pairwise_sum_of_constant(value, n - half)
