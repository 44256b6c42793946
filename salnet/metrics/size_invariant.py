"""Size-invariant MAE and F-measure (Li et al., ICML 2024) as PySODMetrics 1.6.2's
`SizeInvarianceMAE` and `SizeInvarianceFmeasureV2` (F-measure handler, per sample) compute them, per image.

The objects are the GT's 4-connected components of at least 50 pixels (if none is that large, the
largest ones, ties included); each is scored inside its bounding box, so that a small object
weighs as much as a large one.

- SI-MAE: with T objects, B the pixels outside every box and r = |B| / (N - |B|), the mean of
  (r x the mean error over B) and each box's mean error, weighted 1 / (T + r) each. Without
  foreground: the plain MAE.
- SI-F: each object scores the F-measure curve and the adaptive F of the prediction zeroed
  outside its box against the GT inside its box, over the whole image (as the reference does);
  per image SI-maxF, SI-meanF and SI-adpF are the means over its objects of the curve's max, its
  mean and the adaptive F. Without foreground: one "object", the whole image (F is then 0).

Deliberate difference: where the boxes cover every pixel (a GT everywhere, or a frame around the
image) the reference fails (an assertion, or NaN for SI-MAE); here the background term has
weight r = 0 and contributes 0. The reference packs the boxes into bits of a float64 image,
which loses boxes beyond 53 objects in one image; here each box is kept as it is.

Runs on the host, one image at a time: the connected components come from scipy.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from salnet.metrics.histogram import LEVELS
from salnet.metrics.measures import f_measure

MIN_AREA = 50  # the reference's area_threshold: smaller objects count only if none is larger


def object_boxes(fg: np.ndarray) -> list[tuple[slice, slice]]:
    """The bounding boxes of the GT's objects (see the module docstring), in label order."""
    labels, count = ndimage.label(fg)  # the default structure is 4-connectivity (skimage's connectivity=1)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    chosen = np.flatnonzero(areas >= MIN_AREA)
    if chosen.size == 0:
        chosen = np.flatnonzero(areas == areas.max())
    boxes = ndimage.find_objects(labels)
    return [boxes[i] for i in chosen]


def size_invariant(
    image: np.ndarray, levels: np.ndarray, level_values: np.ndarray, fg: np.ndarray, families
) -> dict[str, float]:
    """SI-MAE and / or SI-F (as `families` asks) of one normalised prediction `image` (float64
    [H, W]), whose 8-bit `levels` (int [H, W]) normalise to `level_values` (float64 [256]), against
    its foreground `fg` (bool [H, W])."""
    boxes = object_boxes(fg)
    out = {}
    if "SI-MAE" in families:
        out["SI-MAE"] = _si_mae(np.abs(image - fg), boxes)
    if "SI-F" in families:
        out.update(_si_f(image, levels, level_values, fg, boxes))
    return out


def _si_mae(error: np.ndarray, boxes: list[tuple[slice, slice]]) -> float:
    if not boxes:
        return float(error.mean())
    outside = np.ones(error.shape, dtype=bool)
    for box in boxes:
        outside[box] = False
    bg_area = int(np.count_nonzero(outside))
    ratio = bg_area / (error.size - bg_area)
    factor = 1 / (len(boxes) + ratio)
    total = ratio * float(error[outside].sum()) / bg_area * factor if bg_area else 0.0
    for box in boxes:
        total += float(error[box].sum()) / error[box].size * factor
    return total


def _si_f(image, levels, level_values, fg, boxes) -> dict[str, float]:
    """Per object: counts of its box's pixels per (GT, level), plus the pixels outside the box,
    which the reference scores as prediction 0 and background."""
    pixels = fg.size
    boxes = boxes or [(slice(None), slice(None))]
    # Slot LEVELS holds the outside pixels: value 0.0 exactly, whatever level 0 normalises to.
    values = torch.from_numpy(np.append(level_values, 0.0))
    bins = (values * 255).to(torch.int64).clamp(0, LEVELS - 1)  # the reference's 8-bit curve bins
    counts = np.zeros((len(boxes), 2, LEVELS + 1))
    sums = np.zeros(len(boxes))
    for k, box in enumerate(boxes):
        box_levels, box_fg = levels[box].ravel(), fg[box].ravel()
        counts[k, 1, :LEVELS] = np.bincount(box_levels[box_fg], minlength=LEVELS)
        counts[k, 0, :LEVELS] = np.bincount(box_levels[~box_fg], minlength=LEVELS)
        counts[k, 0, LEVELS] = pixels - box_levels.size
        sums[k] = image[box].sum()
    counts_t = torch.from_numpy(counts)
    binned = torch.zeros(len(boxes), 2, LEVELS, dtype=torch.float64).index_add_(2, bins, counts_t)
    at_least = binned.flip(2).cumsum(2)  # [T, 2, 256]: pixels in bins >= 255 - i
    gt_fg = counts_t[:, 1].sum(1)
    curve = f_measure(at_least[:, 1], at_least.sum(1), gt_fg[:, None])[2]
    # Adaptive: the masked prediction's min(2 mean, 1) over the whole image.
    threshold = (2 * torch.from_numpy(sums) / pixels).clamp(max=1)
    above = (values[None] >= threshold[:, None]).to(torch.float64)
    true_pos = (counts_t[:, 1] * above).sum(1)
    adaptive = f_measure(true_pos, (counts_t.sum(1) * above).sum(1), gt_fg)[2]
    return {
        "SI-maxF": curve.amax(1).mean().item(),
        "SI-meanF": curve.mean(1).mean().item(),
        "SI-adpF": adaptive.mean().item(),
    }
