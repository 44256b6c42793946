"""The fusion head: one logit map from all pyramid levels (the per-level side logits of deep supervision are 1x1 convs in salnet.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation


class FusionHead(nn.Module):
    """P2..P5 -> one logit map at P2's resolution: resize to P2, concat (or sum), 1x1 conv-norm-ReLU, 1x1 conv.

    The mixing conv is 1x1 because P2..P4 are already 3x3-smoothed and P5 holds the PPM's pooled
    context: UPerNet's 3x3 over the 4 x 256 concatenation at stride 4 would cost 18 GMACs, about
    as much as the rest of the ResNet-50 network at 352 px.
    """

    def __init__(self, width: int, levels: int, fuse: Literal["concat", "sum"], norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.fuse = fuse
        in_channels = width * levels if fuse == "concat" else width
        self.mix = Conv2dNormActivation(in_channels, width, kernel_size=1, norm_layer=norm_layer)
        self.logit = nn.Conv2d(width, 1, kernel_size=1)

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        finest = pyramid[0]
        resized = [finest] + [
            F.interpolate(p, size=finest.shape[-2:], mode="bilinear", align_corners=False) for p in pyramid[1:]
        ]
        fused = torch.cat(resized, dim=1) if self.fuse == "concat" else sum(resized[1:], resized[0])
        return self.logit(self.mix(fused))
