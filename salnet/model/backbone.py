"""The encoder: a torchvision ResNet/ResNeXt cut into its four stages C2..C5.

torchvision's own model code and weight format; its feature-extraction utility returns the
stage outputs (strides 4, 8, 16, 32) and drops the pooling and classifier layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from salnet.model.weights import load_backbone_weights

STAGES = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
# C5's channels; each earlier stage has half the channels of the next. Known by name so the
# decoder's widths can be checked before any weights are read.
C5_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnext50_32x4d": 2048}
# Every norm layer inside these backbones has a multiple of 64 channels.
NORM_CHANNEL_QUANTUM = 64


def stage_channels(name: str) -> list[int]:
    """Channels of C2..C5 of torchvision model `name`."""
    c5 = C5_CHANNELS[name]
    return [c5 // 8, c5 // 4, c5 // 2, c5]


def build_backbone(name: str, weights: str, norm_layer: Callable[[int], nn.Module]) -> nn.Module:
    """A module mapping an image to {'c2': ..., 'c5': ...} (strides 4..32) for torchvision model `name`.

    Weights are loaded into the full torchvision model first, so a file saved from it (classifier
    included) loads as it is.
    """
    resnet = torchvision.models.get_model(name, weights=None, norm_layer=norm_layer)
    load_backbone_weights(resnet, name, weights)
    return create_feature_extractor(resnet, return_nodes=STAGES)
