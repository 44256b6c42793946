"""Validate: every rank runs its share of each val set, metric sums are all-reduced per set.

All ranks take part in every collective, so no rank sits in a collective while another is still
evaluating (the rank-0-only pattern that trips NCCL timeouts). Predictions are upsampled to each
mask's original size before scoring, because SOD metrics are defined at GT resolution.

Besides the scores, `Validator` keeps what the dashboards show of the latest validation
(`Validator.last_details`, one `SetDetails` per set): the mean curves, every image's own metrics
with its key, a fixed panel of images with their predictions and the worst images by MAE.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from salnet import dist
from salnet.config import MEAN_OVER_SETS, Config
from salnet.data import ValBatch, ValStream
from salnet.metrics import SODMetrics, metric_names

# uint8 images [B, 3, H, W] -> float32 logits [B, 1, H, W] (Strategy.predict, or a plain model's)
Predict = Callable[[torch.Tensor], torch.Tensor]
# A scored batch, its probabilities and its masks (on the device), as validate() scores them
Observe = Callable[[ValBatch, list[torch.Tensor], list[torch.Tensor]], None]

PER_IMAGE_METRICS = ("MAE", "maxF", "maxE", "S")
MAX_CELL_SIDE = 256  # panel pictures: enough to judge a map, small enough to gather and log every validation


class NonFinitePredictions(ValueError):
    """The network predicts NaN or Inf: it has diverged (every rank raises it together)."""


def probabilities_at(logits: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Saliency probabilities in [0, 1], one [H, W] map per logit map, resized to its size."""
    return [
        F.interpolate(logit[None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].sigmoid()
        for logit, size in zip(logits, sizes)
    ]


@torch.no_grad()
def validate(
    predict: Predict, val_data: Iterable[ValBatch], metrics: SODMetrics, observe: Observe | None = None
) -> dict[str, float]:
    """Score this rank's val batches with `predict`; returns the metrics of the whole val set (all ranks).
    `observe`, if given, also sees every scored batch with its probabilities (nothing of the scoring changes)."""
    metrics.reset()
    device = dist.device()
    non_finite = torch.zeros((), dtype=torch.int64, device=device)  # counted on the device: no sync per batch
    # A progress bar only where a person watches: rank 0, on a terminal (not in job logs).
    progress = tqdm(
        val_data,
        total=len(val_data),
        desc="validate",
        unit="batch",
        leave=False,
        disable=not (dist.is_main() and sys.stderr.isatty()),
    )
    for batch in progress:
        preds = probabilities_at(predict(batch["image"]), [tuple(m.shape[-2:]) for m in batch["masks"]])
        if batch["pad"]:
            continue  # a forward pass for ZeRO-3's collectives only; it scores nothing
        finite = (
            torch.stack([p.isfinite().all() for p in preds])
            if preds
            else torch.ones(0, dtype=torch.bool, device=device)
        )
        non_finite += (~finite).sum()
        if not bool(finite.all()):
            continue  # a diverged network: reported for the whole set below, on every rank together
        masks = [m.to(device, non_blocking=True) for m in batch["masks"]]
        metrics.update(preds, masks, keys=batch["key"])  # the keys are kept only by a per_image SODMetrics
        if observe is not None:
            observe(batch, preds, masks)
    # Every rank learns of non-finite predictions anywhere before the metrics' own all-reduce.
    bad = int(dist.all_reduce_scalar(float(non_finite), "sum"))
    if bad:
        raise NonFinitePredictions(f"{bad} validation image(s) got non-finite predictions (NaN or Inf)")
    metrics.all_reduce()
    return metrics.compute()


@torch.no_grad()
def per_image_metrics(preds: list[torch.Tensor], masks: list[torch.Tensor]) -> dict[str, list[float]]:
    """MAE, maxF, maxE and S of each image, in the order given: SODMetrics' own per-image values (the
    ones its means are of; maxF and maxE the max of the image's own curve), for tables of single images."""
    if not preds:
        return {name: [] for name in PER_IMAGE_METRICS}
    metrics = SODMetrics(("F", "E", "S", "MAE"), device=preds[0].device, per_image=True)
    metrics.update(preds, masks, keys=[f"{i:09d}" for i in range(len(preds))])  # sorted keys: the order given
    rows = metrics.per_image()
    return {
        "MAE": rows["MAE"].tolist(),
        "maxF": rows["F"].max(1).tolist(),
        "maxE": rows["E"].max(1).tolist(),
        "S": rows["S"].tolist(),
    }


@dataclass
class Sample:
    """One val image as the dashboards show it: uint8 pictures at the mask's aspect, longest side <= MAX_CELL_SIDE."""

    key: str
    image: np.ndarray  # [h, w, 3]
    gt: np.ndarray  # [h, w]
    pred: np.ndarray  # [h, w], the prediction x 255
    metrics: dict[str, float]  # PER_IMAGE_METRICS


@dataclass
class SetDetails:
    """What one val set's latest validation looked like, beyond its scores."""

    curves: dict[str, list]  # SODMetrics.curves(): every rank
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # key -> PER_IMAGE_METRICS; rank 0 only
    panel: list[Sample] = field(default_factory=list)  # the fixed panel, in panel order; rank 0 only
    worst: list[Sample] = field(default_factory=list)  # the highest MAE first; rank 0 only


def panel_rank(key: str) -> bytes:
    """The panel holds the K keys that sort first by this hash: the same images at every validation,
    whatever the world size, and spread over the set rather than its first shard."""
    return hashlib.blake2b(key.encode(), digest_size=8).digest()


def cell_size(height: int, width: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resized(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] float -> [C, h, w], antialiased when shrinking."""
    return F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.round().clamp(0, 255).to(torch.uint8).cpu().numpy()


class DetailCollector:
    """Keeps, on each rank, the candidates for one set's panel and worst-K table while validation
    runs (at most K of each, so memory stays small), and every image's metrics; `gather()` merges
    the ranks' candidates on rank 0. Costs one extra histogram pass per batch, at validation only."""

    def __init__(self, panel_images: int, worst_images: int, side: int):
        self.panel_k, self.worst_k, self.side = panel_images, worst_images, side
        self.reset()

    def reset(self) -> None:
        self._panel: list[tuple] = []  # max-heap on the panel hash: (negated hash, tie, Sample)
        self._worst: list[tuple] = []  # min-heap on MAE: (MAE, negated key order, tie, Sample)
        self._per_image: list[tuple[str, dict[str, float]]] = []
        self._tie = itertools.count()

    def observe(self, batch: ValBatch, preds: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        values = per_image_metrics(preds, masks)
        for i, key in enumerate(batch["key"]):
            scores = {name: values[name][i] for name in PER_IMAGE_METRICS}
            self._per_image.append((key, scores))
            order = _negated(panel_rank(key))
            if len(self._panel) < self.panel_k or order > self._panel[0][0]:
                self._push(self._panel, self.panel_k, (order, next(self._tie), self._sample(batch, preds, i, scores)))
            worst = (scores["MAE"], _negated(key.encode()))
            if len(self._worst) < self.worst_k or worst > self._worst[0][:2]:
                self._push(self._worst, self.worst_k, (*worst, next(self._tie), self._sample(batch, preds, i, scores)))

    def gather(self) -> dict:
        """The set's panel, worst images and per-image metrics over all ranks (a collective: every
        rank calls it); rank 0 gets them, the others empty ones."""
        mine = ([entry[-1] for entry in self._panel], [entry[-1] for entry in self._worst], self._per_image)
        everyone = dist.all_gather_object(mine)
        self.reset()
        if not dist.is_main():
            return {}
        panel = sorted((s for part in everyone for s in part[0]), key=lambda s: (panel_rank(s.key), s.key))[
            : self.panel_k
        ]
        worst = sorted((s for part in everyone for s in part[1]), key=lambda s: (-s.metrics["MAE"], s.key))[
            : self.worst_k
        ]
        per_image = {key: scores for part in everyone for key, scores in part[2]}
        return {"panel": panel, "worst": worst, "per_image": per_image}

    @staticmethod
    def _push(heap: list, k: int, entry: tuple) -> None:
        if len(heap) < k:
            heapq.heappush(heap, entry)
        else:
            heapq.heapreplace(heap, entry)

    def _sample(self, batch: ValBatch, preds: list[torch.Tensor], i: int, scores: dict[str, float]) -> Sample:
        mask = batch["masks"][i]
        size = cell_size(*mask.shape[-2:], self.side)
        return Sample(
            key=batch["key"][i],
            metrics=scores,
            image=_to_uint8(_resized(batch["image"][i], size).permute(1, 2, 0)),
            gt=_to_uint8(_resized(mask[None], size)[0]),
            pred=_to_uint8(_resized(preds[i][None] * 255, size)[0]),
        )


def _negated(b: bytes) -> tuple[int, ...]:
    """A key that sorts in the reverse order of `b` (heapq has only min-heaps)."""
    return tuple(-x for x in b) + (1,)


class Validator:
    """The named val sets of `data.val`, each scored separately on every rank.

    Scores are keyed SET/METRIC (plus SET/images), and mean/METRIC, the mean over sets, when
    there is more than one set: the keys metrics.jsonl, W&B and best.pt use. After each call,
    `last_details` holds each set's `SetDetails` (curves on every rank; panel, worst images and
    per-image metrics on rank 0, when log.panel_images or log.worst_images ask for them).
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, pad_to_equal: bool = False):
        self.cfg = cfg
        self.streams = {
            name: ValStream(
                cfg.data.model_copy(update={"val": sources}),
                rank=rank,
                world_size=world_size,
                pad_to_equal=pad_to_equal,
            )
            for name, sources in cfg.data.val_sets.items()
        }
        self.metrics = SODMetrics(cfg.eval.metrics, device=dist.device())
        wanted = cfg.log.panel_images or cfg.log.worst_images
        self.collector = (
            DetailCollector(cfg.log.panel_images, cfg.log.worst_images, min(cfg.data.eval_size, MAX_CELL_SIDE))
            if wanted
            else None
        )
        self.last_details: dict[str, SetDetails] = {}

    def __call__(self, predict: Predict) -> dict[str, float]:
        scores: dict[str, float] = {}
        details: dict[str, SetDetails] = {}
        for name, stream in self.streams.items():
            observe = self.collector.observe if self.collector else None
            scores.update(
                {
                    f"{name}/{metric}": value
                    for metric, value in validate(predict, stream, self.metrics, observe).items()
                }
            )
            scores[f"{name}/images"] = self.metrics.num_images
            details[name] = SetDetails(
                curves=self.metrics.curves(), **(self.collector.gather() if self.collector else {})
            )
        if len(self.streams) > 1:
            for metric in metric_names(self.cfg.eval.metrics):
                scores[f"{MEAN_OVER_SETS}/{metric}"] = sum(scores[f"{name}/{metric}"] for name in self.streams) / len(
                    self.streams
                )
        self.last_details = details
        return scores

    def best_value(self, scores: dict[str, float]) -> float:
        """The value of eval.best_metric in `scores` (one set's, or the mean over sets)."""
        return scores[best_key(self.cfg)]


def best_key(cfg: Config) -> str:
    """The scores key eval.best_metric names: SET/METRIC, or METRIC of the mean over sets (of the one set, if only one)."""
    best_set, metric = cfg.eval.best_set_and_metric
    if best_set is None:
        sets = list(cfg.data.val_sets)
        best_set = MEAN_OVER_SETS if len(sets) > 1 else sets[0]
    return f"{best_set}/{metric}"
