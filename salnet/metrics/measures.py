"""Per-image F-measure, E-measure, IoU, Dice, BER, S-measure and MAE from the joint histograms (see `histogram.py`).

Each function returns float64 tensors with a leading batch dimension. Expressions follow
PySODMetrics 1.6.2 operation by operation (the formulas are in the package docstring); where the
reference compares floats for equality, the comparison is made on the same quantities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from salnet.metrics.histogram import LEVELS, Histograms
from salnet.metrics.reference_float import numpy_mean_of_constant_block

EPS = torch.finfo(torch.float64).eps  # numpy's np.spacing(1), which the reference adds
BETA2 = 0.3  # F-measure's beta^2
S_ALPHA = 0.5  # S-measure's object/region balance


def f_measure(true_pos: torch.Tensor, pred_pos: torch.Tensor, gt_pos: torch.Tensor):
    """(precision, recall, F) from counts; a zero count in a denominator gives 0, like the reference."""
    precision = true_pos / pred_pos.clamp(min=1)
    recall = true_pos / gt_pos.clamp(min=1)
    numerator = (1 + BETA2) * precision * recall
    denominator = torch.where(numerator == 0, 1.0, BETA2 * precision + recall)
    return precision, recall, numerator / denominator


def e_measure(fg_fg: torch.Tensor, fg_bg: torch.Tensor, gt_fg: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """E-measure of a binarised prediction from its counts: `fg_fg` predicted foreground on GT
    foreground, `fg_bg` predicted foreground on GT background, `gt_fg` GT foreground pixels, `size`
    all pixels."""
    pred_fg = fg_fg + fg_bg
    pred_bg = size - pred_fg
    bg_fg = gt_fg - fg_fg
    # The four (prediction, GT) combinations stacked in front: pixel counts, and each side's
    # deviation from its mean (1 or 0 minus the mean).
    parts = torch.stack(torch.broadcast_tensors(fg_fg, fg_bg, bg_fg, pred_bg - bg_fg))
    mean_pred, mean_gt = pred_fg / size, gt_fg / size
    pred_dev = torch.stack([1 - mean_pred, 1 - mean_pred, -mean_pred, -mean_pred])
    gt_dev = torch.stack(torch.broadcast_tensors(1 - mean_gt, -mean_gt, 1 - mean_gt, -mean_gt))
    align = 2 * (pred_dev * gt_dev) / (pred_dev * pred_dev + gt_dev * gt_dev + EPS)
    enhanced = (align + 1) * (align + 1) / 4
    total = (enhanced * parts).sum(0)
    total = torch.where(gt_fg == 0, pred_bg, torch.where(gt_fg == size, pred_fg, total))
    return total / (size - 1 + EPS)


@dataclass
class Binarised:
    """Per image, the confusion counts of the prediction binarised at each of the 256 curve
    thresholds ([B, 256]) and at the adaptive threshold ([B]), with the GT's foreground and size."""

    true_pos: torch.Tensor
    false_pos: torch.Tensor
    adaptive_true_pos: torch.Tensor
    adaptive_false_pos: torch.Tensor
    gt_fg: torch.Tensor
    pixels: torch.Tensor


def binarise(h: Histograms) -> Binarised:
    """Curve index i is threshold 255 - i (PySODMetrics' order): a pixel is foreground when its
    normalised value's 8-bit bin, floor(value * 255), is at least the threshold. The adaptive
    threshold is min(2 mean, 1) on the normalised values."""
    whole = h.whole  # [B, 2, 256]
    # The reference's `(pred * 255).astype(np.uint8)`. Levels absent from an image normalise
    # outside [0, 1]; they count no pixels, the clamp only keeps their index in range.
    bins = (h.values * 255).to(torch.int64).clamp(0, LEVELS - 1)
    binned = torch.zeros_like(whole).scatter_add_(2, bins[:, None, :].expand_as(whole), whole)
    at_least = binned.flip(2).cumsum(2)  # [B, 2, 256]: pixels in bins >= 255 - i
    threshold = (2 * mean_value(h)).clamp(max=1)
    above = (h.values >= threshold[:, None]).to(torch.float64)  # [B, 256]
    return Binarised(
        true_pos=at_least[:, 1],
        false_pos=at_least[:, 0],
        adaptive_true_pos=(whole[:, 1] * above).sum(1),
        adaptive_false_pos=(whole[:, 0] * above).sum(1),
        gt_fg=whole[:, 1].sum(1),
        pixels=h.pixels,
    )


def curves_and_adaptive(h: Histograms) -> dict[str, torch.Tensor]:
    """F and E over the 256 thresholds, and at the adaptive threshold, per image."""
    b = binarise(h)
    gt_fg = b.gt_fg[:, None]
    precision, recall, f_curve = f_measure(b.true_pos, b.true_pos + b.false_pos, gt_fg)
    tp, fp = b.adaptive_true_pos, b.adaptive_false_pos
    return dict(
        precision=precision,
        recall=recall,
        F=f_curve,
        E=e_measure(b.true_pos, b.false_pos, gt_fg, b.pixels[:, None]),
        adpF=f_measure(tp, tp + fp, b.gt_fg)[2],
        adpE=e_measure(tp, fp, b.gt_fg, b.pixels),
    )


def overlap_measures(h: Histograms) -> dict[str, torch.Tensor]:
    """IoU, Dice and BER over the 256 thresholds and at the adaptive threshold, per image: the
    reference's FmeasureV2 handlers (IOUHandler, DICEHandler, BERHandler) on the same counts."""
    b = binarise(h)
    out = {}
    for prefix, tp, fp, gt_fg in (
        ("", b.true_pos, b.false_pos, b.gt_fg[:, None]),
        ("adp", b.adaptive_true_pos, b.adaptive_false_pos, b.gt_fg),
    ):
        pixels = b.pixels if prefix else b.pixels[:, None]
        gt_bg = pixels - gt_fg
        true_neg = gt_bg - fp
        out[prefix + "IoU"] = _ratio(tp, tp + fp + (gt_fg - tp))
        out[prefix + "Dice"] = _ratio(2 * tp, gt_fg + tp + fp)
        out[prefix + "BER"] = 1 - 0.5 * (_ratio(tp, gt_fg) + _ratio(true_neg, gt_bg))
    return out


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 where the denominator is 0 (the reference's `divide`)."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1.0), 0.0)


def mean_value(h: Histograms) -> torch.Tensor:
    return (h.whole.sum(1) * h.values).sum(1) / h.pixels


def mae(h: Histograms) -> torch.Tensor:
    whole = h.whole
    return ((whole[:, 1] * (1 - h.values)).sum(1) + (whole[:, 0] * h.values).sum(1)) / h.pixels


def s_measure(h: Histograms) -> torch.Tensor:
    """Structure measure: 1 - mean without GT foreground, mean with GT everywhere, otherwise
    max(0, alpha * object + (1 - alpha) * region)."""
    whole = h.whole
    gt_share = whole[:, 1].sum(1) / h.pixels
    mean = mean_value(h)
    # The object term scores the foreground's values and the background's (1 - values).
    fg_score = _object_score(whole[:, 1], h.values)
    bg_score = _object_score(whole[:, 0], 1 - h.values)
    object_score = fg_score * gt_share + bg_score * (1 - gt_share)
    region_score = (_quadrant_ssim(h) * h.quadrant_weights).sum(1)
    combined = (object_score * S_ALPHA + region_score * (1 - S_ALPHA)).clamp(min=0)
    return torch.where(gt_share == 0, 1 - mean, torch.where(gt_share == 1, mean, combined))


def _object_score(counts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """2 m / (m^2 + 1 + std + eps) over the pixels counted in `counts` [B, 256] (std with ddof=1, 0 for one pixel)."""
    n = counts.sum(1)
    mean = (counts * values).sum(1) / n.clamp(min=1)
    centred = values - mean[:, None]
    var = (counts * centred * centred).sum(1) / (n - 1).clamp(min=1)
    std = torch.where(n > 1, var.sqrt(), 0.0)
    return 2 * mean / (mean * mean + 1 + std + EPS)


def _quadrant_ssim(h: Histograms) -> torch.Tensor:
    """float64 [B, 4]: the reference's `ssim` of each quadrant.

    An empty quadrant (the centroid on the last row or column, e.g. in some 2x2 images) has zero
    area weight. PySODMetrics computes 0 * NaN = NaN for it; here its sums are all 0, so it scores
    1 (a = b = 0) and contributes 1 * 0: the documented "an empty quadrant contributes 0".
    """
    bg, fg = h.counts[:, :, 0], h.counts[:, :, 1]  # [B, 4, 256]
    both = bg + fg
    values = h.values[:, None, :]
    n = both.sum(2)
    n_fg = fg.sum(2)
    x = (both * values).sum(2) / n.clamp(min=1)
    y = n_fg / n.clamp(min=1)
    dof = n - 1 + EPS
    centred = values - x[..., None]
    sigma_x = (both * centred * centred).sum(2) / dof
    sigma_y = (n_fg * (1 - y) * (1 - y) + (n - n_fg) * y * y) / dof
    sigma_xy = (centred * (fg * (1 - y)[..., None] - bg * y[..., None])).sum(2) / dof
    alpha = 4 * x * y * sigma_xy
    beta = (x * x + y * y) * (sigma_x + sigma_y)
    score = torch.where(alpha != 0, alpha / (beta + EPS), (beta == 0).to(torch.float64))
    return _uniform_quadrants_as_reference(h, score, both, n, n_fg)


def _uniform_quadrants_as_reference(h: Histograms, score, both, n, n_fg) -> torch.Tensor:
    """Where a quadrant's GT and prediction are both uniform, the reference's ssim is 1 exactly when
    numpy's mean of the constant block equals the constant (its variance is then exactly 0), else 0.

    That depends on numpy's summation rounding, which is reproduced on the host for these rare
    quadrants only (see `reference_float.py`).
    """
    uniform = (n > 0) & ((n_fg == 0) | (n_fg == n)) & ((both > 0).sum(2) == 1)
    if not bool(uniform.any()):
        return score
    image, quadrant = uniform.nonzero(as_tuple=True)
    level = both[image, quadrant].argmax(1)
    constants = h.values[image, level].tolist()
    rows = h.quadrant_rows[image, quadrant].tolist()
    cols = h.quadrant_cols[image, quadrant].tolist()
    widths = h.widths[image].tolist()
    exact = [numpy_mean_of_constant_block(c, r, k, w) == c for c, r, k, w in zip(constants, rows, cols, widths)]
    score = score.clone()
    score[image, quadrant] = torch.tensor(exact, dtype=torch.float64, device=score.device)
    return score
