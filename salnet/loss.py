"""Saliency losses: one pixel loss on every output, weighted for deep supervision.

    total = L(fused) + sum_i side_weights[i] * L(side_i)

(side_i: salnet's P2..P5, or the side logits of a model.factory network, in the order it returns them)

with L, per `loss.kind`:
  bce_iou    BCE + soft IoU: the BASNet/F3Net hybrid (pixel-level + map-level terms)
  structure  F3Net's structure loss: BCE and IoU weighted up to 6x near mask boundaries
  dice       BCE + soft Dice
Each term is a per-image value averaged over the batch. Everything runs in float32 with autocast
off: sums over 100k pixels in bf16 keep about 3 significant digits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from salnet.config import ConfigError, LossConfig

# F3Net's smoothing of the IoU ratio: an empty mask with an empty prediction costs 0, not 0/0.
SMOOTH = 1.0
# F3Net's boundary weight: 1 + 5 * |local mean of the mask (31x31) - mask|.
BOUNDARY_KERNEL = 31
BOUNDARY_GAIN = 5.0
FIRST_SIDE = 2  # side outputs are logged as side2, side3, ...: salnet's P2..P5

PixelLoss = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _per_image_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=(-2, -1)).flatten()


def soft_iou(prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """1 - (|P∩T| + 1) / (|P∪T| + 1) per image, with soft (optionally pixel-weighted) set sizes."""
    overlap, total = prob * target, prob + target
    if weight is not None:
        overlap, total = overlap * weight, total * weight
    inter = _per_image_sum(overlap)
    return 1 - (inter + SMOOTH) / (_per_image_sum(total) - inter + SMOOTH)


def soft_dice(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - (2|P∩T| + 1) / (|P| + |T| + 1) per image."""
    return 1 - (2 * _per_image_sum(prob * target) + SMOOTH) / (_per_image_sum(prob + target) + SMOOTH)


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy per image."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(-2, -1)).flatten()


def bce_iou(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"bce": bce(logits, target).mean(), "iou": soft_iou(torch.sigmoid(logits), target).mean()}


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"bce": bce(logits, target).mean(), "dice": soft_dice(torch.sigmoid(logits), target).mean()}


def structure(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """F3Net's weighted BCE + weighted IoU.

    F3Net's released code passes reduce='none' to BCE, which torch reads as reduce=True, so its
    BCE term is the plain mean; this one is weighted, as the paper's equations say.
    """
    local_mean = F.avg_pool2d(target, BOUNDARY_KERNEL, stride=1, padding=BOUNDARY_KERNEL // 2)
    weight = 1 + BOUNDARY_GAIN * (local_mean - target).abs()
    pixel_bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    weighted_bce = _per_image_sum(pixel_bce * weight) / _per_image_sum(weight)
    return {"wbce": weighted_bce.mean(), "wiou": soft_iou(torch.sigmoid(logits), target, weight).mean()}


PIXEL_LOSSES: dict[str, PixelLoss] = {"bce_iou": bce_iou, "structure": structure, "dice": bce_dice}


class DeepSupervisionLoss:
    """loss(outputs, target) -> (total, components).

    outputs: the network's [fused, side...] logits (training) or the fused logits alone (eval),
    each [B, 1, H, W] at the target's size; target: [B, 1, H, W] in [0, 1].
    components (detached, for logging): 'fused' and its terms ('fused_bce', 'fused_iou', ...),
    and each side output's unweighted loss ('side2', 'side3', ...).
    """

    def __init__(self, pixel_loss: PixelLoss, side_weights: Sequence[float]):
        self.pixel_loss = pixel_loss
        self.weights = (1.0, *side_weights)
        self.names = ("fused", *(f"side{i + FIRST_SIDE}" for i in range(len(side_weights))))

    def __call__(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        if len(outputs) not in (1, len(self.weights)):
            raise ValueError(
                f"the loss got {len(outputs)} outputs; it takes the fused output alone or all {len(self.weights)} "
                f"(fused + one per loss.side_weights={list(self.weights[1:])})"
            )
        with torch.autocast(device_type=target.device.type, enabled=False):
            target = target.float()
            total = target.new_zeros(())
            components: dict[str, torch.Tensor] = {}
            for name, weight, logits in zip(self.names, self.weights, outputs):
                if logits.shape != target.shape:
                    raise ValueError(
                        f"output '{name}' has shape {tuple(logits.shape)} but the target has {tuple(target.shape)}; "
                        f"both must be [B, 1, H, W] at the input size"
                    )
                terms = self.pixel_loss(logits.float(), target)
                loss = sum(terms.values())
                total = total + weight * loss
                components[name] = loss.detach()
                if name == self.names[0]:
                    components.update({f"{name}_{term}": value.detach() for term, value in terms.items()})
        return total, components


def build_loss(cfg: LossConfig) -> DeepSupervisionLoss:
    return DeepSupervisionLoss(PIXEL_LOSSES[cfg.kind], cfg.side_weights)


def check_side_weights(cfg: LossConfig, side_logits: int, network: str) -> None:
    """At build time: one loss.side_weights entry per side logit the network returns in training."""
    if side_logits != len(cfg.side_weights):
        raise ConfigError(
            f"{network} returns {side_logits} side logits in training, but loss.side_weights={cfg.side_weights} "
            f"weighs {len(cfg.side_weights)}: give one weight per side logit"
            + (" (loss.side_weights=[]: no deep supervision)" if side_logits == 0 else "")
        )
