"""Run by test_strategy.py: a few optimizer steps of a tiny GroupNorm network through the
strategy, each rank taking its slice of one fixed global batch; rank 0 saves the final weights.

usage: strategy_probe.py OUT.pt GLOBAL_BATCH STEPS [config overrides...]
"""

import sys

import torch
from torch import nn

from salnet import dist
from salnet.config import load_config
from salnet.strategy import build_strategy


class TinyNet(nn.Module):
    """No BatchNorm: its batch statistics would differ between 1x8 and 2x4 by design."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        return self.head(self.backbone(x))


def tiny_net(model_cfg):
    """TinyNet as a model.factory network: a whole run's config around it (convert rebuilds it)."""
    return TinyNet()


def bce(outputs, target):
    loss = nn.functional.binary_cross_entropy_with_logits(outputs.float(), target)
    return loss, {"bce": loss.detach()}


def main():
    out, global_batch, steps, *overrides = sys.argv[1:]
    global_batch, steps = int(global_batch), int(steps)
    cfg = load_config(None, ["train.channels_last=false", *overrides])
    with dist.distributed():
        torch.manual_seed(0)
        model = TinyNet()
        strategy = build_strategy(cfg, model, total_steps=steps)
        gen = torch.Generator().manual_seed(1)
        world, rank, accum = dist.world_size(), dist.rank(), cfg.train.grad_accum
        per_rank = global_batch // world
        micro = per_rank // accum
        for _ in range(steps):
            images = torch.randn(global_batch, 3, 12, 12, generator=gen)
            targets = (torch.rand(global_batch, 1, 12, 12, generator=gen) > 0.5).float()
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            images, targets = images[mine], targets[mine]
            for i in range(accum):
                part = slice(i * micro, (i + 1) * micro)
                strategy.forward_backward(images[part], targets[part], bce, sync=i == accum - 1)
            result = strategy.optimizer_step()
            assert result.skipped is None, result
        if dist.is_main():
            torch.save(strategy.fp32_state_dict(), out)


if __name__ == "__main__":
    main()
