"""What a network costs: parameters and FLOPs, counted in one place for the model report, the
backbone table (`python -m salnet.bench backbones`) and MFU (`python -m salnet.bench gpu`, `step`).

FLOPs are torch.utils.flop_counter's count of one forward pass (a multiply-add is 2 FLOPs). They
depend on shapes only, so `meta_model` builds the network on the meta device: no memory, no
initialisation, no weights read, which keeps even vit_h_14 (0.6 G parameters) a matter of seconds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from salnet.config import ModelConfig
from salnet.model.salnet import SalNet, build_model
from salnet.model.weights import NO_WEIGHTS

# In training mode the PPM's 1x1 bin is BatchNorm over one value per channel and image, which
# needs two images; the count is per image either way.
TRAIN_COUNT_BATCH = 2
# The backward pass costs about twice the forward (a gradient for the input and one for the weights).
TRAIN_FLOPS_PER_FORWARD = 3


class ParameterCounts(NamedTuple):
    total: int
    backbone: int
    trainable: int


def meta_model(cfg: ModelConfig) -> SalNet:
    """The network `cfg` describes, on the meta device and without weights: shapes only."""
    backbone = cfg.backbone.model_copy(update={"weights": NO_WEIGHTS})
    with torch.device("meta"):
        return build_model(cfg.model_copy(update={"backbone": backbone}))


def parameter_counts(model: SalNet) -> ParameterCounts:
    return ParameterCounts(
        total=sum(p.numel() for p in model.parameters()),
        backbone=sum(p.numel() for p in model.backbone.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


def forward_flops(model: nn.Module, height: int, width: int, batch: int = 1) -> float:
    """FLOPs of one forward pass per image, in the model's current mode, on the model's device."""
    x = torch.zeros(batch, 3, height, width, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / batch


def train_flops_per_image(model: nn.Module, height: int, width: int) -> float:
    """FLOPs of one training step per image (forward in training mode, side outputs included, and
    backward): what MFU is computed from. Leaves the model in training mode."""
    model.train()
    return TRAIN_FLOPS_PER_FORWARD * forward_flops(model, height, width, batch=TRAIN_COUNT_BATCH)
