"""The one pass over pixels: per image, a joint histogram of (S-measure quadrant, GT, 8-bit level).

Every metric but wF is a function of this histogram, because after quantisation a pixel's value is
one of 256 levels: the min-max normalised value of level q is a per-image table `values[q]`, and
sums over pixels become sums over (quadrant, GT, level) counts. The quadrants are the S-measure's
split of the image at the rounded GT centroid; summing them gives the whole-image histogram.

`count_pixels` runs once per same-size batch; `combine` then joins all the images of an update,
whatever their sizes, so that the per-image arithmetic runs once per update on [images, 256]
tensors instead of once per size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS = 256
QUADRANTS = 4  # left-top, right-top, left-bottom, right-bottom: PySODMetrics' order


@dataclass
class PixelCounts:
    """A same-size batch after the pixel pass."""

    counts: torch.Tensor  # int64 [B, 4, 2, 256]: pixels per (quadrant, GT bg/fg, 8-bit level)
    top_rows: torch.Tensor  # int64 [B]: rows above the split (the reference's cy)
    left_cols: torch.Tensor  # int64 [B]: columns left of the split (its cx)
    height: int
    width: int


@dataclass
class Histograms:
    """Images of any sizes, reduced to what the metrics need; all tensors lead with the image."""

    counts: torch.Tensor  # float64 [B, 4, 2, 256]: pixels per (quadrant, GT bg/fg, 8-bit level)
    values: torch.Tensor  # float64 [B, 256]: min-max normalised value of each 8-bit level
    pixels: torch.Tensor  # float64 [B]: H * W
    widths: torch.Tensor  # int64 [B]
    quadrant_rows: torch.Tensor  # int64 [B, 4]
    quadrant_cols: torch.Tensor  # int64 [B, 4]
    quadrant_weights: torch.Tensor  # float64 [B, 4]: each quadrant's share of the area

    @property
    def whole(self) -> torch.Tensor:
        """float64 [B, 2, 256]: pixels per (GT bg/fg, level) over the whole image."""
        return self.counts.sum(1)


def count_pixels(levels: torch.Tensor, foreground: torch.Tensor) -> PixelCounts:
    """`levels` int32 [B, H, W] in 0..255 and `foreground` bool [B, H, W] -> `PixelCounts`."""
    batch, height, width = levels.shape
    device = levels.device
    # int32 accumulation: several times faster than bool's default int64 on the CPU.
    top_rows = _split(foreground.sum(2, dtype=torch.int32))
    left_cols = _split(foreground.sum(1, dtype=torch.int32))

    # Bin index ((image * 4 + quadrant) * 2 + fg) * 256 + level. The quadrant is 2 * bottom + right;
    # the per-row and per-column parts are built small and broadcast in the in-place adds.
    image = torch.arange(batch, device=device)[:, None]
    bottom = torch.arange(height, device=device)[None, :] >= top_rows[:, None]
    right = torch.arange(width, device=device)[None, :] >= left_cols[:, None]
    row_offset = ((image * QUADRANTS + bottom * 2) * 2 * LEVELS).to(torch.int32)[:, :, None]
    col_offset = (right * 2 * LEVELS).to(torch.int32)[:, None, :]
    index = torch.add(levels, foreground, alpha=LEVELS).add_(row_offset).add_(col_offset)
    counts = torch.bincount(index.view(-1), minlength=batch * QUADRANTS * 2 * LEVELS)
    return PixelCounts(counts.view(batch, QUADRANTS, 2, LEVELS), top_rows, left_cols, height, width)


def combine(parts: list[PixelCounts]) -> Histograms:
    """The batches of one update, concatenated, with the per-image tables the metrics read."""
    device = parts[0].counts.device
    counts = torch.cat([p.counts.to(device) for p in parts]).to(torch.float64)
    top_rows = torch.cat([p.top_rows.to(device) for p in parts])
    left_cols = torch.cat([p.left_cols.to(device) for p in parts])
    heights = torch.cat([torch.full_like(p.top_rows, p.height, device=device) for p in parts])
    widths = torch.cat([torch.full_like(p.left_cols, p.width, device=device) for p in parts])
    bottom_rows, right_cols = heights - top_rows, widths - left_cols
    area = (heights * widths).to(torch.float64)
    # The reference's weight expressions in its order (the last weight is 1 minus the others).
    left_top = (left_cols * top_rows) / area
    right_top = (top_rows * right_cols) / area
    left_bottom = (bottom_rows * left_cols) / area
    return Histograms(
        counts=counts,
        values=normalised_values(counts.sum((1, 2))),
        pixels=area,
        widths=widths,
        quadrant_rows=torch.stack([top_rows, top_rows, bottom_rows, bottom_rows], 1),
        quadrant_cols=torch.stack([left_cols, right_cols, left_cols, right_cols], 1),
        quadrant_weights=torch.stack([left_top, right_top, left_bottom, 1 - left_top - right_top - left_bottom], 1),
    )


def normalised_values(level_counts: torch.Tensor) -> torch.Tensor:
    """float64 [B, 256]: PySODMetrics' `pred / 255`, then `(pred - min) / (max - min)` unless constant.

    The same float64 operations in the same order as the reference, so the results are bitwise
    identical, which keeps its later `(pred * 255).astype(np.uint8)` binning exact.
    """
    scaled = torch.arange(LEVELS, device=level_counts.device, dtype=torch.float64) / 255
    present = (level_counts > 0).to(torch.uint8)
    low = scaled[present.argmax(1)][:, None]
    high = scaled[LEVELS - 1 - present.flip(1).argmax(1)][:, None]
    span = high - low
    return torch.where(span != 0, (scaled - low) / torch.where(span != 0, span, 1.0), scaled)


def _split(fg_per_line: torch.Tensor) -> torch.Tensor:
    """PySODMetrics' `int(round(mean foreground coordinate)) + 1` along one axis, int64 [B].

    The mean is an exact integer sum over an exact count, rounded half to even like `np.round`.
    Without foreground the reference uses round(size / 2); the S-measure never reads the
    quadrants then (it takes its empty-GT branch), but the split must still be defined.
    """
    size = fg_per_line.shape[1]
    coords = torch.arange(size, device=fg_per_line.device, dtype=torch.int64)
    count = fg_per_line.sum(1)
    mean = (fg_per_line * coords).sum(1).to(torch.float64) / count.clamp(min=1).to(torch.float64)
    mean = torch.where(count > 0, mean, size / 2)
    return torch.round(mean).to(torch.int64) + 1
