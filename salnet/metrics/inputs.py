"""From what `SODMetrics.update` accepts to same-size batches of 8-bit levels and foreground masks.

Everything here stays on the predictions' device. The only host round trip is one range check per
same-size batch (a bad probability must stop the update with a clear message, not poison a sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Images = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class Batch:
    """Images of one size: `levels` int32 [B, H, W] in 0..255, `foreground` bool [B, H, W]."""

    levels: torch.Tensor
    foreground: torch.Tensor


def batches(preds: Images, gts: Images) -> list[Batch]:
    """Check the pairs, group them by size and convert each group (see `to_levels`, `to_foreground`).

    Every input is validated before any is converted, so a bad pair anywhere raises before the
    caller has touched its state.
    """
    pairs = _same_size_pairs(preds, gts)
    for p, g in pairs:
        if not p.is_floating_point():
            raise TypeError(f"predictions have dtype {p.dtype}; they must be float probabilities in [0, 1]")
        if g.is_complex():
            raise TypeError(
                f"ground truths have dtype {g.dtype}; expected bool, uint8 (0..255), "
                "another integer type (0..255) or float in [0, 1]"
            )
        _check_range(p, "predictions", 0.0, 1.0)
        if g.dtype not in (torch.bool, torch.uint8):
            _check_range(g, "ground truths", 0, 1 if g.is_floating_point() else 255)
    return [Batch(levels=to_levels(p), foreground=to_foreground(g.to(p.device, non_blocking=True))) for p, g in pairs]


def to_levels(probs: torch.Tensor) -> torch.Tensor:
    """floor(p * 255) as int32, the 8-bit level a saved PNG holds.

    Computed in the prediction's own precision (float16/bfloat16 are widened to float32, where
    p * 255 is exact), i.e. what `(p * 255).astype(np.uint8)` gives for the numpy array of the same
    dtype. Truncation is the floor here because p >= 0.
    """
    return (probs.to(torch.promote_types(probs.dtype, torch.float32)) * 255).to(torch.int32)


def to_foreground(gts: torch.Tensor) -> torch.Tensor:
    """GT > 128 on the 0..255 scale; a float GT in [0, 1] is first quantised like a prediction.

    floor(g * 255) > 128 is the same as g * 255 >= 129, which needs no floor.
    """
    if gts.dtype == torch.bool:
        return gts
    if gts.is_floating_point():
        return gts.to(torch.promote_types(gts.dtype, torch.float32)) * 255 >= 129
    return gts > 128


def _same_size_pairs(preds: Images, gts: Images) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(preds [B, H, W], gts [B, H, W]) per image size; two batch tensors pass through uncopied."""
    if isinstance(preds, torch.Tensor) and isinstance(gts, torch.Tensor):
        p, g = _as_batch(preds, "preds"), _as_batch(gts, "gts")
        if p.shape != g.shape:
            raise ValueError(
                f"predictions have shape {tuple(preds.shape)} but ground truths have shape {tuple(gts.shape)}"
            )
        pairs = [(p, g)]
    else:
        pred_list, gt_list = _as_list(preds, "preds"), _as_list(gts, "gts")
        if len(pred_list) != len(gt_list):
            raise ValueError(f"got {len(pred_list)} predictions but {len(gt_list)} ground truths")
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, (p, g) in enumerate(zip(pred_list, gt_list)):
            if p.shape != g.shape:
                raise ValueError(
                    f"prediction {i} has shape {tuple(p.shape)} but its ground truth has shape {tuple(g.shape)}"
                )
            by_size.setdefault(tuple(p.shape), []).append(i)
        pairs = [
            (torch.stack([pred_list[i] for i in members]), torch.stack([gt_list[i] for i in members]))
            for members in by_size.values()
        ]
    for p, _ in pairs:
        if p.numel() == 0 and p.shape[0] > 0:
            raise ValueError(f"images of shape {tuple(p.shape[1:])} have no pixels")
    return [(p, g) for p, g in pairs if p.shape[0] > 0]


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{name}: a tensor must be [B, H, W] or [B, 1, H, W], got shape {tuple(x.shape)}")
    return x


def _as_list(x: Images, name: str) -> list[torch.Tensor]:
    """A batch tensor or a sequence of [H, W] / [1, H, W] tensors, as a list of [H, W]."""
    if isinstance(x, torch.Tensor):
        return list(_as_batch(x, name).unbind(0))
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(x).__name__}")
    out = []
    for i, t in enumerate(x):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
        if t.dim() == 3 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 2:
            raise ValueError(f"{name}[{i}]: expected [H, W] or [1, H, W], got shape {tuple(t.shape)}")
        out.append(t)
    return out


def _check_range(x: torch.Tensor, what: str, low: float, high: float) -> None:
    lo, hi = torch.stack(torch.aminmax(x)).tolist()  # one host round trip for both
    # NaN compares false both ways, so it lands here too.
    if not (low <= lo and hi <= high):
        raise ValueError(f"{what} must lie in [{low}, {high}]; this batch spans [{lo}, {hi}]")
