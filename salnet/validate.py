"""Validate: every rank runs its share of the val set, metric sums are all-reduced.

All ranks take part in every collective, so no rank sits in a collective while another is still
evaluating (the rank-0-only pattern that trips NCCL timeouts). Predictions are upsampled to each
mask's original size before scoring, because SOD metrics are defined at GT resolution.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from salnet import dist
from salnet.data import ValBatch
from salnet.metrics import SODMetrics

# uint8 images [B, 3, H, W] -> float32 logits [B, 1, H, W] (Strategy.predict, or a plain model's)
Predict = Callable[[torch.Tensor], torch.Tensor]


def probabilities_at(logits: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Saliency probabilities in [0, 1], one [H, W] map per logit map, resized to its size."""
    return [F.interpolate(logit[None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].sigmoid()
            for logit, size in zip(logits, sizes)]


@torch.no_grad()
def validate(predict: Predict, val_data: Iterable[ValBatch], metrics: SODMetrics) -> dict[str, float]:
    """Score this rank's val batches with `predict`; returns the metrics of the whole val set (all ranks)."""
    metrics.reset()
    device = dist.device()
    # A progress bar only where a person watches: rank 0, on a terminal (not in job logs).
    progress = tqdm(val_data, total=len(val_data), desc="validate", unit="batch", leave=False,
                    disable=not (dist.is_main() and sys.stderr.isatty()))
    for batch in progress:
        preds = probabilities_at(predict(batch["image"]), [tuple(m.shape[-2:]) for m in batch["masks"]])
        if batch["pad"]:
            continue  # a forward pass for ZeRO-3's collectives only; it scores nothing
        metrics.update(preds, [m.to(device, non_blocking=True) for m in batch["masks"]])
    metrics.all_reduce()
    return metrics.compute()
