"""The seam of plain ViT (torchvision vit_b_16, vit_l_16, vit_h_14): a simple feature pyramid (ViTDet).

ViT gives one map at the patch stride. As in ViTDet (Li et al. 2022), C2..C5 come from its last
layer alone: two stride-2 deconvolutions (with LayerNorm and GELU between) to stride 4, one to
stride 8, the map itself at 16, 2x2 max pooling to 32. The pyramid's layers are new (not in the
pretrained file). Position embeddings are resized (bicubic, as ViTDet and timm do) to each
input's patch grid at forward time, so any input size works. vit_h_14's 14 px patches: the padded
image is resized by 14/16 first, so its token grid is still input / 16.
model.backbone.checkpointing: in training, each encoder layer runs under activation checkpointing
(salnet.model.stages.run_blocks).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.vision_transformer import Encoder, VisionTransformer

from salnet.model.stages import STRIDES, crop_to_input, pad_to_multiple, run_blocks

log = logging.getLogger(__name__)

TOKEN_STRIDE = STRIDES[2]  # the ViT map is C4
POSITION_KEY = "encoder.pos_embedding"


def resize_position_grid(pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[1, 1 + g*g, D] (class token first, then a square g x g grid) -> [1, 1 + height*width, D], bicubic.

    Also to g x g (bicubic to the same size is bitwise the identity): a branch on the size would be
    frozen into a model traced for TorchScript at the size it was traced at.
    """
    cls, grid = pos[:, :1], pos[:, 1:]
    side = math.isqrt(grid.shape[1])
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, height * width, -1)], dim=1)


def fit_position_embedding(model: VisionTransformer, state: dict) -> dict:
    """`state` with its position embeddings resized to `model`'s grid (a file of another image size)."""
    pos = state.get(POSITION_KEY)
    ours = model.encoder.pos_embedding
    if pos is None or pos.shape == ours.shape:
        return state
    side = math.isqrt(ours.shape[1] - 1)
    log.info(
        "vit: position embeddings of the weights file resized (bicubic) from %s to %s",
        tuple(pos.shape),
        tuple(ours.shape),
    )
    return {**state, POSITION_KEY: resize_position_grid(pos, side, side)}


class PositionedEncoder(nn.Module):
    """torchvision's ViT Encoder (same parameters, same state-dict keys) whose position embeddings are
    resized to the token grid of each input.

    The embeddings are read in this module's own forward: ZeRO-3 gathers a module's parameters when
    its forward starts, and torchvision's Encoder.forward (which adds them at their file size) is
    not called.
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.pos_embedding = encoder.pos_embedding
        self.dropout = encoder.dropout
        self.layers = encoder.layers
        self.ln = encoder.ln

    def forward(self, tokens: torch.Tensor, rows: int, cols: int, checkpointing: bool) -> torch.Tensor:
        """[N, 1 + rows*cols, D] (class token first) -> the last layer's normalised tokens, same shape."""
        x = tokens + resize_position_grid(self.pos_embedding, rows, cols)
        return self.ln(run_blocks(self.layers, self.dropout(x), checkpointing))


class ViTPyramid(nn.Module):
    """torchvision VisionTransformer -> {'c2', 'c3', 'c4', 'c5'} at strides 4, 8, 16, 32.

    Holds the model's conv_proj, class_token and encoder under those names, so their state-dict
    keys are torchvision's (the classifier `heads` is dropped). Channels: D/4, D/2, D, D.
    """

    def __init__(self, vit: VisionTransformer, checkpointing: bool = False):
        super().__init__()
        self.checkpointing = checkpointing
        self.patch_size = vit.patch_size
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.encoder = PositionedEncoder(vit.encoder)
        dim = vit.hidden_dim
        self.to_stride4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
        )
        self.to_stride8 = nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)
        self.to_stride32 = nn.MaxPool2d(kernel_size=2, stride=2)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output as a map [N, D, H/16, W/16] of a padded image (H, W multiples of 16)."""
        rows, cols = x.shape[-2] // TOKEN_STRIDE, x.shape[-1] // TOKEN_STRIDE
        if self.patch_size != TOKEN_STRIDE:
            x = F.interpolate(
                x, size=(rows * self.patch_size, cols * self.patch_size), mode="bilinear", align_corners=False
            )
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [N, rows*cols, D]
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x, rows, cols, self.checkpointing and self.training)
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, rows, cols)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        c4 = self.tokens(pad_to_multiple(x))
        return crop_to_input([self.to_stride4(c4), self.to_stride8(c4), c4, self.to_stride32(c4)], height, width)
