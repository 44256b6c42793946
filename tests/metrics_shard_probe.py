"""Sharded SODMetrics under torchrun (or as one plain process): every rank builds the same images,
adds its share, all-reduces, and rank 0 writes compute(), curves() and the image count as JSON.

    torchrun --nproc_per_node N tests/metrics_shard_probe.py OUT.json [--idle-last-rank]

--idle-last-rank gives the last rank no images at all (its share goes to rank 0), as when a
validation set has fewer images than ranks.
"""

import json
import sys

import torch

from salnet import dist
from salnet.metrics import FAMILIES, SODMetrics


def sample_pairs(count: int = 24, seed: int = 0):
    """Mixed sizes (square, wide, tall, 2x2), soft uint8 GT, some images without foreground. (No 1x1
    image: its E-measure is 1 / eps, which would swamp every other E in the sums.)"""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(2, 2), (17, 23), (23, 17), (9, 40), (30, 30)]
    pairs = []
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        pred = torch.rand(height, width, generator=gen)
        gt = (torch.rand(height, width, generator=gen) * 255).to(torch.uint8)
        if i % 5 == 0:
            gt.zero_()
        pairs.append((pred, gt))
    return pairs


def main(out_path: str, idle_last_rank: bool) -> None:
    with dist.distributed(timeout_s=120):
        rank, world = dist.rank(), dist.world_size()
        owners = [i % world for i in range(len(sample_pairs()))]
        if idle_last_rank and world > 1:
            owners = [0 if owner == world - 1 else owner for owner in owners]
        mine = [pair for pair, owner in zip(sample_pairs(), owners) if owner == rank]
        metrics = SODMetrics(FAMILIES)
        # Two updates per rank: the sums must not care how the images were split into calls.
        for part in (mine[: len(mine) // 2], mine[len(mine) // 2 :]):
            if part:
                metrics.update([p for p, _ in part], [g for _, g in part])
        metrics.all_reduce()
        if dist.is_main():
            with open(out_path, "w") as f:
                json.dump(
                    {
                        "world": world,
                        "images": metrics.num_images,
                        "values": metrics.compute(),
                        "curves": metrics.curves(),
                    },
                    f,
                )


if __name__ == "__main__":
    main(sys.argv[1], "--idle-last-rank" in sys.argv[2:])
