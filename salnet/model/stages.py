"""The seam of the hierarchical transformer/ConvNeXt families: torchvision Swin, Swin V2, ConvNeXt.

Their `features` is [stem, stage1, (downsample, stage) x 3]: the outputs of the four stages are
C2..C5 (strides 4, 8, 16, 32). Swin's are channels-last (N, H, W, C) and become (N, C, H, W) here,
once. These models floor odd sizes at every downsampling, so the seam pads the image (bottom and
right, zeros: the mean colour after normalisation) to a multiple of 32 and crops C_s back to
ceil(H / s): the same sizes a ResNet gives, covering the whole image, at any input size.

model.backbone.checkpointing: in training, each block of the four stages runs under activation
checkpointing (`run_blocks`): its activations are recomputed in the backward pass, so only the
blocks' inputs stay in memory (one extra forward pass of the backbone; the peak of a recomputation is one
block's, not a whole stage's). The RNG state is saved and restored around the recomputation
(torch.utils.checkpoint's preserve_rng_state), so stochastic depth drops the same samples twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

FEATURE_KEYS = ("c2", "c3", "c4", "c5")
STRIDES = (4, 8, 16, 32)
# torchvision's `features` of Swin, Swin V2 and ConvNeXt: stem, stage, (downsample, stage) x 3.
STAGE_OUTPUTS = (1, 3, 5, 7)


def ceil_div(size: int, divisor: int) -> int:
    """ceil(size / divisor), in the form torch.export's symbolic shapes simplify (not -(-size // divisor))."""
    return (size + divisor - 1) // divisor


def pad_to_multiple(x: torch.Tensor, multiple: int = STRIDES[-1]) -> torch.Tensor:
    """x padded with zeros at the bottom and right to a multiple of `multiple`.

    Also by zero rows and columns (a copy): a branch on the size would be frozen into a model traced
    for TorchScript at the size it was traced at, and skip the padding at every other size.
    """
    height, width = x.shape[-2:]
    return F.pad(
        x, (0, ceil_div(width, multiple) * multiple - width, 0, ceil_div(height, multiple) * multiple - height)
    )


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """blocks(x), each block under activation checkpointing if `checkpointing` and gradients are being recorded."""
    if not (checkpointing and torch.is_grad_enabled()):
        return blocks(x)
    for block in blocks:
        x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return x


def crop_to_input(features: list[torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
    """{'c2': ..., 'c5': ...}: each level cropped to ceil(input / its stride), the part the image covers.

    Cropped by a negative pad, not a slice: for a symbolic input size (an ONNX export of any size),
    torch.export must prove a slice's end within the padded size, which it cannot for ceil(H / s)
    against 32 * ceil(H / 32) / s; a pad's output size is plain arithmetic. Same values as the slice.
    """
    return {
        key: F.pad(f, (0, ceil_div(width, stride) - f.shape[-1], 0, ceil_div(height, stride) - f.shape[-2]))
        for key, stride, f in zip(FEATURE_KEYS, STRIDES, features)
    }


class StageBackbone(nn.Module):
    """torchvision Swin / Swin V2 / ConvNeXt `features` -> {'c2', 'c3', 'c4', 'c5'} (N, C, H, W).

    Holds the model's `features` under that name, so its state-dict keys are torchvision's.
    """

    def __init__(self, features: nn.Sequential, channels_last_stages: bool, checkpointing: bool = False):
        super().__init__()
        self.features = features
        self.channels_last_stages = channels_last_stages
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        x = pad_to_multiple(x)
        outputs = []
        for i, module in enumerate(self.features):
            if i not in STAGE_OUTPUTS:
                x = module(x)  # the stem or a downsampling layer
                continue
            x = run_blocks(module, x, self.checkpointing and self.training)
            outputs.append(x.permute(0, 3, 1, 2) if self.channels_last_stages else x)
        return crop_to_input(outputs, height, width)
