"""Adjust input: what a train batch becomes on the device before the network sees it.

The loader hands over uint8 batches; `TrainInput` moves them to the device and turns them into
the network's input (float, ImageNet-normalised, channels_last) and the loss's target (float in
[0, 1]). With data.augment_on=device the batch holds the samples' crop boxes as the workers cut
them, and this is where they are augmented: flip, rotation and colour factors drawn for the whole
batch from this stage's generator, then one warp of image and mask together and the colour map
(salnet.data.augment), batched. The generator is seeded per rank and saved in checkpoints per
rank (`state_dict`), so a resumed run draws exactly what the uninterrupted one would.
"""

from __future__ import annotations

import torch

from salnet.config import DataConfig
from salnet.data.augment import Warp, draw_warp, warp_batch
from salnet.data.plan import device_augment_seed
from salnet.data.stream import TrainBatch
from salnet.data.transforms import normalise, to_model_input, to_target


class TrainInput:
    def __init__(self, cfg: DataConfig, device: torch.device | str, channels_last: bool, seed: int = 0, rank: int = 0):
        self.cfg, self.device, self.channels_last = cfg, torch.device(device), channels_last
        # A CPU generator whatever the device: its draws (a few numbers per sample) are then the same
        # on every kind of device, and its state is a small tensor that loads anywhere.
        self.generator = torch.Generator().manual_seed(device_augment_seed(seed, rank))

    def __call__(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float [B, 3, H, W], target float [B, 1, H, W]) on the device."""
        if "extent" not in batch:  # augmented by the workers (data.augment_on=worker), or made by hand
            return to_model_input(batch["image"], self.device, self.channels_last), to_target(
                batch["mask"], self.device
            )
        images, masks, extent = (batch[k].to(self.device, non_blocking=True) for k in ("image", "mask", "extent"))
        warp = draw_warp(images.shape[0], self.cfg.augment, self.generator).to(self.device)
        return self.augment(images, masks, extent, batch["size"], warp)

    def augment(
        self, images: torch.Tensor, masks: torch.Tensor, extent: torch.Tensor, size: int, warp: Warp
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded crops on the device -> (normalised image, target) at `size`."""
        n = images.shape[0]
        image = torch.empty(
            n,
            3,
            size,
            size,
            device=self.device,
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format,
        )
        target = torch.empty(n, 1, size, size, device=self.device)
        # A GPU takes the batch in one go; a CPU goes sample by sample, whose float intermediates
        # (4 x S x S) stay in its caches (measured 2-3x less time per sample than the whole batch).
        step = n if self.device.type == "cuda" else 1
        for lo in range(0, n, step):
            rows = slice(lo, lo + step)
            warped, mask = warp_batch(images[rows], masks[rows], extent[rows], size, warp.select(rows))
            normalise(warped, self.channels_last, out=image[rows])
            # clamp: bilinear weights sum to 1 only up to rounding, and a target is a probability
            torch.mul(mask, 1 / 255, out=target[rows]).clamp_(0, 1)
        return image, target

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly: the state of this rank's generator."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:  # absent in checkpoints from before this stage drew numbers
            self.generator.set_state(state["generator"])
