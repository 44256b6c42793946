"""The loader in a real two-rank gloo job (torchrun): equal steps, disjoint train batches, every
val sample once, and the same batches the in-process rank simulation of the other tests sees.

Run by torchrun, this file is also the job's script (see the bottom).
"""

import json
import sys

import pytest

from salnet.config import DataConfig
from salnet.data import TrainStream, ValStream
from salnet.shards.synth import synthesize

from conftest import ranks


def loader_cfg(data_dir: str) -> DataConfig:
    return DataConfig(
        train=[f"{data_dir}/train"],
        val=[f"{data_dir}/val"],
        size=32,
        eval_size=32,
        batch_size=2,
        eval_batch_size=3,
        workers=2,
        shuffle_buffer=4,
    )


def rank_report(cfg: DataConfig, rank: int, world: int) -> dict:
    train = TrainStream(cfg, seed=5, rank=rank, world_size=world)
    val = ValStream(cfg, rank=rank, world_size=world, pad_to_equal=True)
    val_batches = list(val)
    return {
        "steps": train.steps_per_epoch,
        "train": [b["key"] for b in train.epoch_batches(0)],
        "val": [k for b in val_batches for k in b["key"]],
        "val_batches": len(val_batches),
    }


@pytest.mark.slow
def test_two_gloo_ranks_split_the_data_as_planned(tmp_path):
    synthesize(tmp_path, train=23, val=7, size=32, shard_samples=5)
    proc = ranks(2, [__file__, tmp_path])
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(reports) == 2
    assert reports[0]["steps"] == reports[1]["steps"] == (23 // 2) // 2
    assert all(len(r["train"]) == r["steps"] for r in reports)
    train_keys = [k for r in reports for batch in r["train"] for k in batch]
    assert len(train_keys) == len(set(train_keys)) == 2 * 5 * 2
    assert sorted(k for r in reports for k in r["val"]) == [f"val_{i:06d}" for i in range(7)]
    # Rank 0 has 3 val samples (one batch, plus one padding batch), rank 1 has 4 (batches of 3 and 1).
    assert reports[0]["val_batches"] == reports[1]["val_batches"] == 2
    cfg = loader_cfg(str(tmp_path))
    assert [rank_report(cfg, r, 2) for r in range(2)] == reports, "in-process rank simulation differs from the real job"


if __name__ == "__main__":
    from salnet import dist

    with dist.distributed(timeout_s=120):
        report = rank_report(loader_cfg(sys.argv[1]), dist.rank(), dist.world_size())
        everyone = dist.all_gather_object(report)
        if dist.is_main():
            print(json.dumps(everyone), flush=True)
