"""Validate: every rank runs its share of the val set, metric sums are all-reduced.

All ranks take part in every collective, so no rank sits in a collective while another is still
evaluating (the rank-0-only pattern that trips NCCL timeouts). Predictions are upsampled to each
mask's original size before scoring, because SOD metrics are defined at GT resolution.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from salnet import dist
from salnet.data import to_model_input
from salnet.metrics import SODMetrics


@torch.no_grad()
def predict_at_mask_size(model: torch.nn.Module, images: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Saliency probabilities in [0, 1], one [H, W] map per image at its mask's size."""
    logits = model(images).float()
    return [F.interpolate(logit[None], size=size, mode="bilinear", align_corners=False)[0, 0].sigmoid()
            for logit, size in zip(logits, sizes)]


@torch.no_grad()
def validate(model: torch.nn.Module, val_data, metrics: SODMetrics, autocast, channels_last: bool) -> dict[str, float]:
    """Run `model` over this rank's val batches; returns the metrics of the whole val set (all ranks)."""
    was_training = model.training
    model.eval()
    metrics.reset()
    device = dist.device()
    # A progress bar only where a person watches: rank 0, on a terminal (not in job logs).
    progress = tqdm(val_data, total=len(val_data), desc="validate", unit="batch", leave=False,
                    disable=not (dist.is_main() and sys.stderr.isatty()))
    for batch in progress:
        images = to_model_input(batch["image"], device, channels_last)
        with autocast():
            preds = predict_at_mask_size(model, images, [tuple(m.shape[-2:]) for m in batch["masks"]])
        if batch["pad"]:
            continue  # a forward pass for ZeRO-3's collectives only; it scores nothing
        metrics.update(preds, [m.to(device, non_blocking=True) for m in batch["masks"]])
    metrics.all_reduce()
    model.train(was_training)
    return metrics.compute()
