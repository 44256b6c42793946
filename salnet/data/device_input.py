"""Adjust input: what a train batch becomes on the device before the network sees it.

The loader hands over uint8 batches; `TrainInput` moves them to the device and turns them into
the network's input (float, ImageNet-normalised, channels_last) and the loss's target (float in
[0, 1]). It is the place for per-batch work done on the device, and it carries state (e.g. random
generators) that checkpoints save per rank.
"""

from __future__ import annotations

import torch

from salnet.config import DataConfig
from salnet.data.stream import TrainBatch
from salnet.data.transforms import to_model_input, to_target


class TrainInput:
    def __init__(self, cfg: DataConfig, device: torch.device, channels_last: bool):
        self.cfg, self.device, self.channels_last = cfg, device, channels_last

    def __call__(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float [B, 3, H, W], target float [B, 1, H, W]) on the device."""
        return to_model_input(batch["image"], self.device, self.channels_last), to_target(batch["mask"], self.device)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (nothing yet: this stage draws no random numbers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
