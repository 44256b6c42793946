"""Multi-scale IoU (Ahmadzadeh et al., ICIP 2021) as PySODMetrics 1.6.2's `MSIoU` computes it, per image.

For a binarised prediction B: the edge maps of B and of the GT (where scipy's Sobel response
along either axis, zero padding, is non-zero), each shrunk by "any edge in the cell" on grids of
cells 1, 2, 4, ..., 512 pixels (zero padding added at the top and left to whole cells); at each
scale r = (|P & G| + 1) / (|G| + 1), and MSIoU is the trapezoidal area under r over the ten
scales (x from 0 to 1). The curve binarises at the thresholds t = 0..256 (ascending, the
reference's order: floor(255 v) >= t), the adaptive value at v >= min(2 mean v, 1).

The reference keeps its edge maps in float16, so |G| is summed exactly and then rounded to
float16, and the + 1 is a float16 addition (above 65504 edge cells it is inf and r is 0); that
rounding is reproduced. Everything runs in torch on the predictions' device, all thresholds of an
image at once (in chunks), instead of the reference's one threshold at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salnet.metrics.histogram import LEVELS

MSIOU_THRESHOLDS = LEVELS + 1  # t = 0..256: 256 binarises to nothing
CELL_SIZES = tuple(2**k for k in range(10))  # the reference's np.power(2, np.linspace(0, 9, 10, dtype=int))
CHUNK_PIXELS = 1 << 24  # binarised maps per conv call: at most this many pixels (64 MiB of float32)


def multiscale_iou(
    levels: torch.Tensor, level_values: torch.Tensor, foreground: torch.Tensor
) -> dict[str, torch.Tensor]:
    """MSIoU of a same-size batch given as 8-bit `levels` (int32 [B, H, W]) whose normalised values
    are `level_values` (float64 [B, 256]), against `foreground` (bool [B, H, W]):
    {"MSIoU": float64 [B, 257] (threshold t at index t), "adpMSIoU": float64 [B]}."""
    curves, adaptive = [], []
    for image_levels, values, fg in zip(levels, level_values, foreground):
        normalised = values[image_levels.long()]  # float64 [H, W]
        bins = (normalised * 255).to(torch.int64)  # the reference's (pred * 255).astype(np.uint8)
        gt_cells = _cells(_edges(fg[None]))
        gt_counts = [cells.sum((1, 2)) for cells in gt_cells]
        # Thresholds that give distinct binary maps: 0, one above each present bin, and 256 (none).
        present = torch.unique(bins)
        distinct = torch.unique(torch.cat([present.new_tensor([0, LEVELS]), present + 1]))
        scores = _scores(bins[None] >= distinct[:, None, None], gt_cells, gt_counts)
        # Every other threshold gives the map of the highest distinct threshold below it.
        thresholds = torch.arange(MSIOU_THRESHOLDS, device=bins.device)
        curves.append(scores[torch.searchsorted(distinct, thresholds, right=True) - 1])
        threshold = (2 * normalised.mean()).clamp(max=1)
        adaptive.append(_scores((normalised >= threshold)[None], gt_cells, gt_counts)[0])
    return {"MSIoU": torch.stack(curves), "adpMSIoU": torch.stack(adaptive)}


def _scores(binary: torch.Tensor, gt_cells: list[torch.Tensor], gt_counts: list[torch.Tensor]) -> torch.Tensor:
    """float64 [T]: MSIoU of each binarised map in `binary` (bool [T, H, W])."""
    per_chunk = max(1, CHUNK_PIXELS // binary[0].numel())
    out = []
    for part in binary.split(per_chunk):
        ratios = []
        for cells, gt, gt_count in zip(_cells(_edges(part)), gt_cells, gt_counts):
            both = (cells & gt).sum((1, 2)).to(torch.float64) + 1
            # The reference's float16 sum of the GT's cells (exact, then rounded), plus 1 in float16.
            ratios.append(both / (gt_count.to(torch.float16) + 1).to(torch.float64))
        ratio = torch.stack(ratios, 1)  # [T, 10]
        # np.trapz(ratio, dx=1 / 9): dx * (y[1:] + y[:-1]) / 2, summed.
        out.append((1 / (len(CELL_SIZES) - 1) * (ratio[:, 1:] + ratio[:, :-1]) / 2.0).sum(1))
    return torch.cat(out)


def _edges(binary: torch.Tensor) -> torch.Tensor:
    """bool [T, H, W]: where either Sobel response of the binary maps is non-zero (zero padding):
    the derivative [-1, 0, 1] along one axis smoothed by [1, 2, 1] along the other, in int16."""
    padded = F.pad(binary.to(torch.int16), (1, 1, 1, 1))
    down = padded[:, 2:] - padded[:, :-2]  # [T, H, W + 2]
    across = padded[:, :, 2:] - padded[:, :, :-2]  # [T, H + 2, W]
    along_rows = down[:, :, :-2] + 2 * down[:, :, 1:-1] + down[:, :, 2:]
    along_cols = across[:, :-2] + 2 * across[:, 1:-1] + across[:, 2:]
    return (along_rows != 0) | (along_cols != 0)


def _cells(edges: torch.Tensor) -> list[torch.Tensor]:
    """Per cell size, bool [T, h, w]: whether any edge lies in each cell of the grid anchored at the
    bottom-right corner (the reference pads the top and left). Those grids nest, so each size is
    the previous one's 2 x 2 blocks, with a row or column of padding where the count is odd."""
    out = [edges]
    cells = edges
    for _ in CELL_SIZES[1:]:
        count, height, width = cells.shape
        cells = F.pad(cells, (width % 2, 0, height % 2, 0))
        cells = cells.view(count, cells.shape[1] // 2, 2, cells.shape[2] // 2, 2).any(4).any(2)
        out.append(cells)
    return out
