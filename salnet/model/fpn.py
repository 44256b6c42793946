"""The top-down feature pyramid (FPN), with the PPM output as its top level (as in UPerNet)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation


class FeaturePyramid(nn.Module):
    """[C2, C3, C4], top -> [P2, P3, P4, P5], every level `width` channels at its input's resolution.

    P5 = top (projected to `width` if needed). Going down, inner_i = lateral_i(C_i) + up(inner_{i+1})
    and P_i = smooth_i(inner_i): the 3x3 smoothing sits outside the top-down sum, as in the FPN paper.
    `up` resizes to the lateral's exact size rather than by 2x, so odd sizes (a 353 px input gives
    C2..C5 of 89, 45, 23, 12) line up.
    """

    def __init__(
        self, in_channels: Sequence[int], top_channels: int, width: int, norm_layer: Callable[[int], nn.Module]
    ):
        super().__init__()
        self.width = width
        self.top = (
            nn.Identity()
            if top_channels == width
            else Conv2dNormActivation(top_channels, width, kernel_size=1, norm_layer=norm_layer)
        )
        self.laterals = nn.ModuleList(
            Conv2dNormActivation(c, width, kernel_size=1, norm_layer=norm_layer) for c in in_channels
        )
        self.smooths = nn.ModuleList(
            Conv2dNormActivation(width, width, kernel_size=3, norm_layer=norm_layer) for _ in in_channels
        )

    def forward(self, features: Sequence[torch.Tensor], top: torch.Tensor) -> list[torch.Tensor]:
        inner = self.top(top)
        pyramid = [inner]
        # From the coarsest lateral down to C2; the loop unrolls into one graph under torch.compile.
        for i in reversed(range(len(self.laterals))):
            lateral = self.laterals[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            pyramid.insert(0, self.smooths[i](inner))
        return pyramid
