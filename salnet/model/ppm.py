"""Pyramid pooling (PSPNet) on C5: context at several scales without changing the feature size."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation


class PyramidPooling(nn.Module):
    """x -> 1x1 conv-norm-ReLU( concat[x, up(branch_b(avgpool_b(x))) for each bin b] ).

    With the default branch width (C/4 for 4 bins) the concatenation has twice x's channels, as in
    PSPNet. Bins larger than the feature map still work: adaptive pooling then repeats pixels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bins: Sequence[int],
        branch_channels: int,
        norm_layer: Callable[[int], nn.Module],
    ):
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(
            Conv2dNormActivation(in_channels, branch_channels, kernel_size=1, norm_layer=norm_layer) for _ in self.bins
        )
        self.project = Conv2dNormActivation(
            in_channels + len(self.bins) * branch_channels, out_channels, kernel_size=1, norm_layer=norm_layer
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(branch(F.adaptive_avg_pool2d(x, bin_size)), size=size, mode="bilinear", align_corners=False)
            for bin_size, branch in zip(self.bins, self.branches)
        ]
        return self.project(torch.cat([x, *pooled], dim=1))
