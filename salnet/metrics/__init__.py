r"""Exact, all-reducible salient-object-detection metrics: `SODMetrics`.

The values reproduce PySODMetrics 1.6.2 (the community's reference, `py_sod_metrics`) called on
each prediction saved as an 8-bit image and each mask; tests/test_metrics.py checks them against it.

Per image, with p the predicted probabilities and g the ground truth:

- Quantisation: q = floor(255 p), in p's own precision (at least float32), i.e. what
  `(p * 255).astype(np.uint8)` stores in a PNG. GT: foreground G = g > 128 on the 0..255 scale
  (bool masks as they are; a float GT in [0, 1] is quantised like p first).
- Normalisation: v = q / 255, then v = (v - min v) / (max v - min v) unless v is constant. N pixels.
- F-measure (beta^2 = 0.3): for each threshold t in 0..255, a pixel is predicted foreground when
  floor(255 v) >= t; P(t) = TP / max(predicted, 1), R(t) = TP / max(|G|, 1),
  F(t) = 1.3 P R / (0.3 P + R), and 0 when P R = 0. Curves are averaged over images;
  maxF = max_t mean F(t), meanF = mean_t mean F(t).
  adpF: the same F with the prediction binarised at v >= min(2 mean(v), 1), averaged over images.
- E-measure: for a binarised prediction B with mean b and GT mean m, each pixel's alignment
  a = 2 (B - b)(G - m) / ((B - b)^2 + (G - m)^2 + eps) is enhanced to (a + 1)^2 / 4 and summed;
  E = sum / (N - 1 + eps). Without GT foreground the sum is the count of predicted background;
  with GT everywhere, the count of predicted foreground. eps = 2^-52 (so a 1x1 image scores
  0 or 1 / eps, as in the reference). Curve over the 256 thresholds, maxE, meanE, and adpE at the
  adaptive threshold, as for F.
- S-measure (alpha = 0.5): 1 - mean(v) without GT foreground, mean(v) with GT everywhere, else
  max(0, 0.5 object + 0.5 region).
  object = m_G o(v on G) + (1 - m_G) o(1 - v off G), o(x) = 2 mean(x) / (mean(x)^2 + 1 + std(x) + eps),
  std with ddof = 1 (0 for a single pixel).
  region: split at (cy, cx) = round(GT centroid) + 1 (half to even) into four quadrants weighted
  by area share; each scores ssim = a / (b + eps) with a = 4 x y s_xy,
  b = (x^2 + y^2)(s_x + s_y) (means x, y; variances and covariance over N_q - 1 + eps), and when
  a = 0 it scores 1 if b = 0 else 0. Where a quadrant's GT and prediction are both uniform, the
  reference's b = 0 test depends on numpy's rounding of the mean; that is reproduced exactly
  (`reference_float.py`).
  Deliberate difference: an empty quadrant (centroid on the last row or column) has weight 0 and
  contributes 0; the reference computes NaN for it and so for the whole image.
- Weighted F-measure (beta = 1): E = |v - G|; each background pixel takes E of its nearest
  foreground pixel (scipy's exact Euclidean feature transform); blurred with MATLAB's 7x7,
  sigma 5 Gaussian (zero padding) into EA; on G, E is replaced by min(E, EA); background errors
  are weighted by 2 - exp(ln(0.5) / 5 * distance to G). R = 1 - mean(Ew on G),
  P = TPw / (TPw + FPw + eps) with TPw = |G| - sum(Ew on G), FPw = sum(Ew off G);
  wF = 2 R P / (R + P + eps), and 0 for an image without foreground.
- MAE = mean |v - G|.

Opt-in families (`FAMILIES` beyond `DEFAULT_FAMILIES`), PySODMetrics 1.6.2's others:

- IoU = TP / (TP + FP + FN), Dice = 2 TP / (2 TP + FP + FN), BER = 1 - (TP / |G| + TN / (N - |G|)) / 2
  (a zero denominator gives 0), over the F-measure's 256 thresholds (max, mean) and at its adaptive
  threshold: the reference's FmeasureV2 handlers. maxBER is the worst threshold, as the toolkits
  report it; lower BER is better.
- MSIoU: multi-scale IoU of the edge maps over the thresholds 0..256 (max, mean) and adaptive
  (`msiou.py`).
- SI-MAE and SI-F (SI-maxF, SI-meanF, SI-adpF): size-invariant MAE and F-measure, each GT object
  scored in its bounding box (`size_invariant.py`).
- HCE: human correction effort of the prediction binarised at 0.5 (`hce.py`; needs scikit-image).

Every reported value is a mean over images of per-image values, so the state is a vector of sums
(the image count, the curves, and one sum per scalar) that an all-reduce can merge:
sharding the images over ranks gives the single-process result up to float64 summation order.

Per image: `SODMetrics(..., per_image=True)` also keeps each image's values with its key, gathered
over ranks by `all_reduce()`, as a `PerImage` (`per_image.py`); `bootstrap.py` turns them into 95 %
intervals and paired permutation tests between methods.

`curve_plots` draws the PR and F-measure-vs-threshold curves (matplotlib, imported only there), for
`salnet.evaluate` and for a run's plots/.
"""

from salnet.metrics.names import (
    DEFAULT_FAMILIES,
    FAMILIES,
    LOWER_IS_BETTER,
    METRICS,
    MissingPackageError,
    is_better,
    metric_names,
)

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "LOWER_IS_BETTER",
    "METRICS",
    "MissingPackageError",
    "PerImage",
    "SODMetrics",
    "is_better",
    "metric_names",
]


def __getattr__(name: str):
    # SODMetrics and PerImage import torch; the names above must not (salnet.config reads them
    # before any heavy import), so their modules load on first use.
    if name == "SODMetrics":
        from salnet.metrics.accumulator import SODMetrics

        return SODMetrics
    if name == "PerImage":
        from salnet.metrics.per_image import PerImage

        return PerImage
    raise AttributeError(f"module 'salnet.metrics' has no attribute {name!r}")
