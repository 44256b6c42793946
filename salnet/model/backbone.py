"""The encoder: a torchvision model cut into C2..C5 (strides 4, 8, 16, 32), whatever its family.

torchvision's own model code and weight format. Each family has its seam:
- ResNet/ResNeXt: torchvision's feature-extraction utility returns the four stage outputs;
- Swin, Swin V2, ConvNeXt: their four stages (salnet.model.stages);
- ViT: a simple feature pyramid from its stride-16 map (salnet.model.vit_pyramid);
- timm/<model>: timm's features_only model at strides 4..32 (salnet.model.timm_backbone; timm's code and weights).
Channels and strides are read off the model itself by a dry pass on the meta device
(`backbone_shape`), so a new family needs no table of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import StochasticDepth

from salnet.config import BACKBONE_FAMILIES, TIMM_FAMILY, TIMM_INSTALL, TIMM_PREFIX, check_backbone_name
from salnet.model.stages import FEATURE_KEYS, STRIDES, StageBackbone
from salnet.model.timm_backbone import build_timm_backbone, import_timm, timm_model_name
from salnet.model.vit_pyramid import ViTPyramid, fit_position_embedding
from salnet.model.weights import IMAGENET, NO_WEIGHTS, load_backbone_weights, torchvision_weights

RESNET_STAGES = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
# Every norm layer inside the ResNet backbones has a multiple of 64 channels.
NORM_CHANNEL_QUANTUM = 64
# The dry pass's input size: a multiple of 32, so each level's stride is exact.
DRY_PASS_SIZE = 224


class BackboneShape(NamedTuple):
    channels: tuple[int, ...]  # of C2..C5
    strides: tuple[int, ...]  # of C2..C5: always 4, 8, 16, 32


def backbone_names() -> dict[str, tuple[str, ...]]:
    """Every backbone name, by family; timm's (an optional extra, over a thousand models) as how to list them."""
    timm_names = (
        f"{TIMM_PREFIX}<model>: a timm model with four feature levels at strides 4..32 ({TIMM_INSTALL}), e.g. "
        f'{TIMM_PREFIX}pvt_v2_b0; timm\'s names: python -c "import timm; print(timm.list_models(pretrained=True))"',
    )
    return {**BACKBONE_FAMILIES, TIMM_FAMILY: timm_names}


def _vit_image_size(name: str) -> int:
    """The image size of the 'imagenet' file of ViT `name`: its position-embedding grid is built at that size,
    so the file loads as it is (the forward pass resizes the embeddings to each input)."""
    return torchvision_weights(name, IMAGENET).meta["min_size"][0]


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 at the first block to `rate` at the last: torchvision's rule for
    stochastic_depth_prob, applied to the built model (torchvision's Swin builders do not take that argument)."""
    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    for i, layer in enumerate(layers):
        layer.p = rate * i / max(1, len(layers) - 1)


def build_backbone(
    name: str,
    weights: str,
    norm_layer: Callable[[int], nn.Module],
    drop_path: float | None = None,
    checkpointing: bool = False,
) -> nn.Module:
    """A module mapping an image to {'c2': ..., 'c5': ...} (strides 4..32) for torchvision model `name`.

    `norm_layer` is the norm of a ResNet backbone; the other families keep their LayerNorm.
    `drop_path`: Swin's and ConvNeXt's stochastic depth at the last block (None: torchvision's default).
    `checkpointing`: activation checkpointing of each block in training (not ResNet: config.py says why).
    Weights are loaded into the full torchvision model, so a file saved from it (classifier
    included) loads as it is; the backbone shares that model's layers. A timm backbone: see
    salnet.model.timm_backbone (`norm_layer` does not apply: it keeps timm's norm layers).
    """
    family = check_backbone_name(name)
    if family == TIMM_FAMILY:
        return build_timm_backbone(name, weights, drop_path, checkpointing)
    adapt = None
    if family == "resnet":
        model = torchvision.models.get_model(name, weights=None, norm_layer=norm_layer)
        backbone = create_feature_extractor(model, return_nodes=RESNET_STAGES)
    elif family in ("swin", "swin_v2", "convnext"):
        model = torchvision.models.get_model(name, weights=None)
        if drop_path is not None:
            set_drop_path(model, drop_path)
        backbone = StageBackbone(model.features, channels_last_stages=family != "convnext", checkpointing=checkpointing)
    else:  # vit
        model = torchvision.models.get_model(name, weights=None, image_size=_vit_image_size(name))
        backbone = ViTPyramid(model, checkpointing=checkpointing)
        adapt = functools.partial(fit_position_embedding, model)
    needed = set(model.state_dict()) & set(backbone.state_dict())
    load_backbone_weights(model, name, weights, needed, adapt)
    return backbone


@functools.cache
def _dry_pass_size(name: str) -> int:
    """DRY_PASS_SIZE, or a timm model's own input size where it has one (timm's Swin takes only that size)."""
    if check_backbone_name(name) != TIMM_FAMILY:
        return DRY_PASS_SIZE
    cfg = import_timm().models.get_pretrained_cfg(timm_model_name(name))
    return cfg.input_size[-1] if cfg is not None and cfg.input_size else DRY_PASS_SIZE


@functools.cache
def backbone_shape(name: str) -> BackboneShape:
    """Channels and strides of C2..C5 of backbone `name`, from one forward pass on the meta device (no memory, no
    initialisation, no random numbers drawn)."""
    size = _dry_pass_size(name)
    with torch.device("meta"):
        backbone = build_backbone(name, NO_WEIGHTS, nn.BatchNorm2d)
        features = backbone(torch.empty(1, 3, size, size))
    shape = BackboneShape(
        channels=tuple(features[k].shape[1] for k in FEATURE_KEYS),
        strides=tuple(size // features[k].shape[-1] for k in FEATURE_KEYS),
    )
    sizes = [tuple(features[k].shape[-2:]) for k in FEATURE_KEYS]
    if shape.strides != STRIDES or any(hw != (size // s,) * 2 for hw, s in zip(sizes, STRIDES)):
        raise RuntimeError(f"backbone {name}: C2..C5 are {sizes} at {size} px; the decoder needs strides {STRIDES}")
    return shape


def stage_channels(name: str) -> list[int]:
    """Channels of C2..C5 of backbone `name` (from the dry pass)."""
    return list(backbone_shape(name).channels)
