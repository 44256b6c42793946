"""Per-image SODMetrics under torchrun (or as one plain process): every rank builds the same images,
adds its share with their keys (interleaved, so no rank holds a contiguous key range), all-reduces,
and rank 0 saves the gathered `PerImage` as OUT.npz.

    torchrun --nproc_per_node N tests/per_image_probe.py OUT.npz
"""

import sys

from salnet import dist
from salnet.metrics import FAMILIES, SODMetrics

from metrics_shard_probe import sample_pairs

COUNT = 15


def keys() -> list[str]:
    # Not in their sorted order: the gathered rows must come back sorted by key, whoever held them.
    return [f"img-{(7 * i) % COUNT:02d}" for i in range(COUNT)]


def main(out_path: str) -> None:
    with dist.distributed(timeout_s=120):
        rank, world = dist.rank(), dist.world_size()
        pairs, names = sample_pairs(COUNT), keys()
        mine = [i for i in range(COUNT) if i % world == rank]
        metrics = SODMetrics(FAMILIES, per_image=True)
        for part in (mine[: len(mine) // 2], mine[len(mine) // 2 :]):  # two updates per rank
            metrics.update([pairs[i][0] for i in part], [pairs[i][1] for i in part], keys=[names[i] for i in part])
        metrics.all_reduce()
        if dist.is_main():
            metrics.per_image().save(out_path)


if __name__ == "__main__":
    main(sys.argv[1])
