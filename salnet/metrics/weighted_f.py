"""Weighted F-measure (Margolin et al., CVPR 2014) as PySODMetrics 1.6.2 computes it, per image.

It runs on the host, one image at a time, in numpy and scipy: it needs the exact
Euclidean nearest-foreground transform, which torch lacks, and which of several equidistant
foreground pixels the transform picks changes the result, so only scipy's own answer reproduces
the reference. One image at a time keeps the working set in cache: about twice as fast as batched
float64 torch on the CPU. On a GPU the copy to the host is small next to the transform.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from salnet.metrics.measures import EPS

BETA = 1.0
BLUR_SIZE, BLUR_SIGMA = 7, 5.0  # MATLAB's fspecial('gaussian', 7, 5)
DECAY = math.log(0.5) / 5  # background importance 2 - exp(DECAY * distance to the foreground)


def weighted_f_measure(values: np.ndarray, fg: np.ndarray) -> float:
    """wF of one normalised prediction (float64 [H, W]) against its foreground (bool [H, W])."""
    if not fg.any():
        return 0.0  # the reference's rule for an image without foreground
    height, width = fg.shape
    rows, cols = ndimage.distance_transform_edt(~fg, return_distances=False, return_indices=True)
    d_row = rows - np.arange(height, dtype=rows.dtype)[:, None]
    d_col = cols - np.arange(width, dtype=cols.dtype)[None, :]
    # Integer squared distances, then one correctly rounded sqrt: scipy's own distances exactly.
    distance = np.sqrt((d_row * d_row + d_col * d_col).astype(np.float64))

    error = np.abs(values - fg)
    # Background pixels take the error of their nearest foreground pixel, so that blurring does
    # not smear background errors into the foreground's border (the reference's "pixel dependency").
    blurred = _gaussian_blur(error.take(rows * width + cols))
    # On the foreground the error may only shrink by blurring; the background's error is weighted
    # by its distance to the foreground, 2 - exp(DECAY * d), which is exactly 1 on the foreground.
    weighted = np.where(fg, np.minimum(blurred, error), error) * (2 - np.exp(DECAY * distance))

    fg_count = float(np.count_nonzero(fg))
    fg_error = float(weighted[fg].sum())
    bg_error = float(weighted.sum()) - fg_error
    true_pos = fg_count - fg_error
    recall = 1 - fg_error / fg_count
    precision = true_pos / (true_pos + bg_error + EPS)
    return (1 + BETA) * recall * precision / (recall + BETA * precision + EPS)


def _gaussian_blur(image: np.ndarray) -> np.ndarray:
    """scipy's `convolve(image, K, mode="constant")` with the 7x7 MATLAB Gaussian K, as two 1-D
    passes (K is the outer product of two 1-D Gaussians; 14 instead of 49 products per pixel)."""
    taps = _GAUSSIAN_TAPS
    return ndimage.correlate1d(ndimage.correlate1d(image, taps, axis=1, mode="constant"), taps, axis=0, mode="constant")


def _gaussian_taps() -> np.ndarray:
    # fspecial also zeroes taps below eps * max, which never happens at this size and sigma.
    offsets = np.arange(BLUR_SIZE) - BLUR_SIZE // 2
    taps = np.exp(-(offsets * offsets) / (2 * BLUR_SIGMA**2))
    return taps / taps.sum()


_GAUSSIAN_TAPS = _gaussian_taps()
