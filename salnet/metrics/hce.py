"""Human correction effort (HCE; Qin et al., ECCV 2022, the DIS benchmark's metric) as PySODMetrics
1.6.2's `HumanCorrectionEffortMeasure` (relax 5, epsilon 2) computes it, per image.

HCE estimates the clicks a person needs to turn the prediction binarised at 0.5 (normalised) into
the GT: the false positives and false negatives are relaxed (a 5-step erosion of prediction | GT
drops the thin errors along true borders, and 5 dilations within the error class bring back
their bodies), the GT's skeleton stays as false negative wherever the prediction misses it; then
for each of the two error masks, its contour points that touch the other classes are split into
polylines, each costing its Ramer-Douglas-Peucker vertices (OpenCV, epsilon 2), and each error
region that touches no other class costs one more. HCE is the total; lower is better.

The morphology, contours and polyline fits are OpenCV's and the skeleton scikit-image's (an
optional dependency: `pip install scikit-image`), as in the reference. The walk along the
contours, the reference's per-point Python loop, is vectorised: a point counts when the other
classes (dilated by one pixel) reach it and no earlier point of any contour sat on its pixel.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

RELAX = 5
EPSILON = 2.0
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=np.uint8)  # skimage's disk(1)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # skimage's label() default in 2-D


def human_correction_effort(pred: np.ndarray, gt: np.ndarray) -> float:
    """HCE of a binarised prediction `pred` against `gt` (both bool [H, W])."""
    skeleton = skeletonize(gt)
    true_pos = gt & pred
    false_pos = pred & ~gt
    false_neg = gt & ~pred
    eroded_union = cv2.erode((gt | pred).astype(np.uint8), _CROSS, iterations=RELAX).astype(bool)

    relaxed_fp = _regrow(false_pos & eroded_union, allowed=~gt) & false_pos
    relaxed_fn = _regrow(false_neg & eroded_union, allowed=~pred) & false_neg
    relaxed_fn |= skeleton & ~true_pos  # the structure the prediction misses

    fp_cost = _correction_cost(relaxed_fp, touching=true_pos | relaxed_fn)
    fn_cost = _correction_cost(relaxed_fn, touching=~(true_pos | relaxed_fp | relaxed_fn))
    return float(fp_cost + fn_cost)


def _regrow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    for _ in range(RELAX):
        seed = cv2.dilate(seed.astype(np.uint8), _CROSS).astype(bool) & allowed
    return seed


def _correction_cost(mask: np.ndarray, touching: np.ndarray) -> int:
    """Polygon vertices along `mask`'s contours where `touching` (dilated by one pixel) reaches
    them, plus one per connected region of `mask` that no such contour point lies in."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    reach = cv2.dilate(touching.astype(np.uint8), _CROSS).astype(bool)
    labels, regions = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if not contours:
        return regions
    points = np.concatenate([c[:, 0] for c in contours])  # int32 [P, 2]: (column, row)
    cols, rows = points[:, 0], points[:, 1]
    first_visit = np.zeros(len(points), dtype=bool)
    first_visit[np.unique(rows.astype(np.int64) * mask.shape[1] + cols, return_index=True)[1]] = True
    kept = reach[rows, cols] & first_visit
    corrected = np.zeros(regions + 1, dtype=bool)
    corrected[labels[rows[kept], cols[kept]]] = True
    vertices = 0
    start = 0
    for contour in contours:
        end = start + len(contour)
        for polyline in _polylines(points[start:end], kept[start:end]):
            vertices += len(cv2.approxPolyDP(polyline[:, None], EPSILON, False))
        start = end
    return vertices + regions - int(corrected[1:].sum())


def _polylines(points: np.ndarray, kept: np.ndarray) -> list[np.ndarray]:
    """The runs of consecutive kept points of one contour; when the last run ends next to where
    the first begins (8-neighbours), the contour's start cut one polyline in two: the first run is
    joined, reversed, to the end of the last (the reference's order, which the fit depends on)."""
    index = np.flatnonzero(kept)
    if index.size == 0:
        return []
    runs = [points[r] for r in np.split(index, np.flatnonzero(np.diff(index) > 1) + 1)]
    if len(runs) > 1 and np.abs(runs[0][0] - runs[-1][-1]).max() == 1:
        runs[-1] = np.concatenate([runs[-1], runs[0][::-1]])
        del runs[0]
    return runs
