"""Validate: every rank runs its share of each val set, metric sums are all-reduced per set.

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
from salnet.config import MEAN_OVER_SETS, Config
from salnet.data import ValBatch, ValStream
from salnet.metrics import SODMetrics, metric_names

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


class Validator:
    """The named val sets of `data.val`, each scored separately on every rank.

    Scores are keyed SET/METRIC (plus SET/images), and mean/METRIC, the mean over sets, when
    there is more than one set: the keys metrics.jsonl, W&B and best.pt use.
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, pad_to_equal: bool = False):
        self.cfg = cfg
        self.streams = {name: ValStream(cfg.data.model_copy(update={"val": sources}), rank=rank, world_size=world_size,
                                        pad_to_equal=pad_to_equal)
                        for name, sources in cfg.data.val_sets.items()}
        self.metrics = SODMetrics(cfg.eval.metrics, device=dist.device())

    def __call__(self, predict: Predict) -> dict[str, float]:
        scores: dict[str, float] = {}
        for name, stream in self.streams.items():
            scores.update({f"{name}/{metric}": value for metric, value in validate(predict, stream, self.metrics).items()})
            scores[f"{name}/images"] = self.metrics.num_images
        if len(self.streams) > 1:
            for metric in metric_names(self.cfg.eval.metrics):
                scores[f"{MEAN_OVER_SETS}/{metric}"] = sum(scores[f"{name}/{metric}"] for name in self.streams) / len(self.streams)
        return scores

    def best_value(self, scores: dict[str, float]) -> float:
        """The value of eval.best_metric in `scores` (one set's, or the mean over sets)."""
        best_set, metric = self.cfg.eval.best_set_and_metric
        if best_set is None:
            best_set = MEAN_OVER_SETS if len(self.streams) > 1 else next(iter(self.streams))
        return scores[f"{best_set}/{metric}"]
