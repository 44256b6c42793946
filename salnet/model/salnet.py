"""SalNet: backbone C2..C5 -> PPM on C5 -> FPN top-down -> fused saliency logit (+ side logits).

Training mode returns [fused, side_P2, side_P3, side_P4, side_P5] for deep supervision; eval mode
returns only the fused logit. Every logit map is [B, 1, H, W] at the input's size (any size: no
level assumes a multiple of 32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from salnet.config import BATCHNORM_FAMILIES, ConfigError, ModelConfig, backbone_family
from salnet.model.backbone import NORM_CHANNEL_QUANTUM, build_backbone, stage_channels
from salnet.model.factory import build_from_factory, dry_output
from salnet.model.fpn import FeaturePyramid
from salnet.model.head import FusionHead
from salnet.model.ppm import PyramidPooling


class SalNet(nn.Module):
    """The saliency network. `backbone` maps an image to {'c2', 'c3', 'c4', 'c5'} (see build_backbone)."""

    def __init__(self, backbone: nn.Module, ppm: PyramidPooling, fpn: FeaturePyramid, head: FusionHead):
        super().__init__()
        self.backbone = backbone  # its own attribute so the trainer can give it a smaller learning rate
        self.ppm = ppm
        self.fpn = fpn
        self.head = head
        self.side_logits = nn.ModuleList(nn.Conv2d(fpn.width, 1, kernel_size=1) for _ in range(len(fpn.laterals) + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[-2:]
        c = self.backbone(x)
        pyramid = self.fpn([c["c2"], c["c3"], c["c4"]], self.ppm(c["c5"]))
        fused = F.interpolate(self.head(pyramid), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return fused
        sides = [
            F.interpolate(side(p), size=size, mode="bilinear", align_corners=False)
            for side, p in zip(self.side_logits, pyramid)
        ]
        return [fused, *sides]


def norm_layer(kind: str, groups: int) -> Callable[[int], nn.Module]:
    """channels -> norm module, for model.norm 'batch' or 'group' (torchvision's norm_layer convention)."""
    return nn.BatchNorm2d if kind == "batch" else functools.partial(nn.GroupNorm, groups)


def _check_group_norm(cfg: ModelConfig, branch_width: int) -> None:
    """GroupNorm needs gn_groups to divide every normalised channel count; checked before any weights are read.

    The widths the config sets were checked when it loaded (ModelConfig); these are the ones the
    backbone decides: the PPM branch width by default (C5 // 4) and a ResNet's own channels."""
    if cfg.norm != "group":
        return
    normalised = {"model.ppm_branch_width": branch_width} if cfg.ppm_branch_width is None else {}
    if backbone_family(cfg.backbone.name) in BATCHNORM_FAMILIES and not cfg.backbone.frozen_bn:
        normalised[f"{cfg.backbone.name}'s channels (multiples of {NORM_CHANNEL_QUANTUM})"] = NORM_CHANNEL_QUANTUM
    wrong = {key: c for key, c in normalised.items() if c % cfg.gn_groups}
    if wrong:
        raise ConfigError(
            f"model.gn_groups={cfg.gn_groups} must divide the channels of every GroupNorm layer; it does not divide "
            + ", ".join(f"{key}={c}" for key, c in wrong.items())
        )


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network model.* describes: model.factory's (salnet.model.factory), else salnet's FPN + PPM."""
    return build_from_factory(cfg) if cfg.factory is not None else build_salnet(cfg)


def side_logits_in_training(model: nn.Module) -> int:
    """How many side logits build_model's network returns in training, besides the fused one."""
    if isinstance(model, SalNet):
        return len(model.side_logits)
    out = dry_output(model, training=True)  # a factory's network: its contract allows a tensor or a list
    return 0 if isinstance(out, torch.Tensor) else len(out) - 1


def build_salnet(cfg: ModelConfig) -> SalNet:
    """Salnet's FPN + PPM network described by `cfg`, with backbone weights loaded per cfg.backbone.weights.

    model.norm is the decoder's norm, and a ResNet backbone's unless frozen_bn; Swin, ConvNeXt and ViT
    keep their LayerNorm. For DDP with model.norm=batch, torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) converts
    every trainable BatchNorm (frozen ones stay frozen).
    """
    channels = stage_channels(cfg.backbone.name)
    branch = cfg.ppm_branch_width or channels[3] // 4
    _check_group_norm(cfg, branch)

    decoder_norm = norm_layer(cfg.norm, cfg.gn_groups)
    backbone_norm = FrozenBatchNorm2d if cfg.backbone.frozen_bn else decoder_norm
    backbone = build_backbone(
        cfg.backbone.name, cfg.backbone.weights, backbone_norm, cfg.backbone.drop_path, cfg.backbone.checkpointing
    )
    ppm = PyramidPooling(channels[3], cfg.ppm_width, cfg.ppm_bins, branch, decoder_norm)
    fpn = FeaturePyramid(channels[:3], cfg.ppm_width, cfg.fpn_width, decoder_norm)
    head = FusionHead(cfg.fpn_width, levels=len(channels), fuse=cfg.fuse, norm_layer=decoder_norm)
    return SalNet(backbone, ppm, fpn, head)
