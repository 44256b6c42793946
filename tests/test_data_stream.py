"""TrainStream and ValStream end to end: real shards (the synth set), real DataLoader workers.

Ranks are simulated by building each rank's stream in this process: the plan is a pure function
of (seed, epoch, world size, workers), so this is what each rank of a real job computes
(test_data_dist.py checks the same with a real gloo group).
"""

import logging
from collections import Counter

import pytest
import torch
import torchvision.transforms.v2.functional as F

from salnet.config import DataConfig
from salnet.data import IMAGENET_MEAN, IMAGENET_STD, DataError, TrainStream, ValStream, to_model_input, to_target
from salnet.shards.synth import synthesize

TRAIN, VAL, SHARD = 30, 13, 10  # 3 train shards, 2 val shards (10 + 3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth"), train=TRAIN, val=VAL, size=64, shard_samples=SHARD)


def data_cfg(synth, **overrides) -> DataConfig:
    train, val = synth
    values = dict(
        train=[str(train)],
        val=[str(val)],
        size=40,
        eval_size=48,
        batch_size=2,
        eval_batch_size=3,
        workers=2,
        shuffle_buffer=4,
    )
    return DataConfig(**{**values, **overrides})


def epoch(stream: TrainStream, number: int) -> list[dict]:
    return list(stream.epoch_batches(number))


def keys_of(batches: list[dict]) -> list[list[str]]:
    return [b["key"] for b in batches]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_equal_steps_on_every_rank_and_no_sample_twice(synth, world):
    # 3 shards against world x 2 readers: from world 2 on there are fewer shards than readers.
    cfg = data_cfg(synth)
    streams = [TrainStream(cfg, seed=0, rank=r, world_size=world) for r in range(world)]
    steps = {s.steps_per_epoch for s in streams}
    assert steps == {(TRAIN // world) // cfg.batch_size}
    keys = []
    for stream in streams:
        batches = epoch(stream, 0)
        assert len(batches) == stream.steps_per_epoch
        for b in batches:
            assert b["image"].dtype == torch.uint8 and b["image"].shape == (2, 3, 40, 40)
            assert b["mask"].dtype == torch.uint8 and b["mask"].shape == (2, 1, 40, 40)
            assert set(b) == {"image", "mask", "key"}
        keys += [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)), "a sample came twice in one epoch"
    assert len(keys) == world * steps.pop() * cfg.batch_size
    if world == 1:  # 3 shards >= 2 readers, and 30 samples fill 15 batches exactly
        assert sorted(keys) == [f"train_{i:06d}" for i in range(TRAIN)]


def test_same_batches_twice_and_a_new_order_next_epoch(synth):
    cfg = data_cfg(synth)
    first, second = (TrainStream(cfg, seed=7, rank=0, world_size=1) for _ in range(2))
    a, b = epoch(first, 0), epoch(second, 0)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, b))
    next_epoch = epoch(first, 1)
    assert keys_of(next_epoch) != keys_of(a)
    assert sorted(k for ks in keys_of(next_epoch) for k in ks) == sorted(k for ks in keys_of(a) for k in ks)
    assert keys_of(epoch(TrainStream(cfg, seed=8, rank=0, world_size=1), 0)) != keys_of(a)


@pytest.mark.parametrize("stop_after", [3, 4])
def test_resume_mid_epoch_gives_exactly_the_uninterrupted_batches(synth, stop_after):
    cfg = data_cfg(synth, shuffle_buffer=6)
    reference = TrainStream(cfg, seed=1, rank=1, world_size=2)
    uninterrupted = epoch(reference, 1)

    interrupted = TrainStream(cfg, seed=1, rank=1, world_size=2)
    for taken, _ in enumerate(interrupted.epoch_batches(1), start=1):
        if taken == stop_after:
            break
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches"], state["world_size"], state["workers"]) == (1, stop_after, 2, 2)

    resumed = TrainStream(cfg, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = epoch(resumed, 1)
    assert keys_of(rest) == keys_of(uninterrupted[stop_after:])
    assert all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        for x, y in zip(rest, uninterrupted[stop_after:])
    ), "augmentation differs after the resume"
    assert resumed.state_dict()["batches"] == resumed.steps_per_epoch
    assert keys_of(epoch(resumed, 2)) == keys_of(epoch(reference, 2)), "the epoch after a resume is a normal epoch"


def test_a_changed_worker_count_restarts_at_the_next_epoch(synth, caplog):
    before = TrainStream(data_cfg(synth, workers=2), seed=0, rank=0, world_size=1)
    batches = before.epoch_batches(0)
    next(batches)
    state = before.state_dict()

    after = TrainStream(data_cfg(synth, workers=1), seed=0, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="salnet.data"):
        after.load_state_dict(state)
    assert "workers 2 -> 1" in caplog.text and "start of epoch 1" in caplog.text
    assert epoch(after, 0) == [], "the rest of the interrupted epoch is skipped"
    assert len(epoch(after, 1)) == after.steps_per_epoch


def test_a_checkpoint_of_an_older_data_order_restarts_at_the_next_epoch(synth, caplog):
    stream = TrainStream(data_cfg(synth, workers=0), seed=0, rank=0, world_size=1)
    state = {**stream.state_dict(), "batches": 1}
    del state["plan"]  # as saved before the order had a version: its batches are not this order's
    with caplog.at_level(logging.WARNING, logger="salnet.data"):
        stream.load_state_dict(state)
    assert "plan None -> 2" in caplog.text and "start of epoch 1" in caplog.text
    assert epoch(stream, 0) == []


def test_weighted_sets_are_mixed_in_one_epoch(synth):
    train, val = synth
    # Equal weights over 30 + 13 samples: 22 from each set per epoch, so the 13 val scenes repeat.
    cfg = data_cfg(synth, train=[str(train), str(val)], train_weights=[1, 1], batch_size=1)
    keys = [k for b in epoch(TrainStream(cfg, seed=0, rank=0, world_size=1), 0) for k in b["key"]]
    from_val = Counter(k for k in keys if k.startswith("val_"))
    from_train = Counter(k for k in keys if k.startswith("train_"))
    assert sum(from_val.values()) == sum(from_train.values()) == 22
    assert len(from_val) == VAL and sorted(from_val.values()) == [1] * 4 + [2] * 9
    assert max(from_train.values()) == 1


def test_too_few_samples_for_a_batch_on_every_rank_stops_with_the_numbers(synth):
    with pytest.raises(
        DataError, match=r"30 train samples per epoch .* less than one batch of data.batch_size=10 on each of 4 ranks"
    ):
        TrainStream(data_cfg(synth, batch_size=10), seed=0, rank=0, world_size=4)


def test_multiscale_picks_one_size_per_batch_the_same_on_every_rank(synth):
    cfg = data_cfg(synth, multiscale=[32, 48], workers=1)
    sizes = [[b["image"].shape[-1] for b in epoch(TrainStream(cfg, seed=0, rank=r, world_size=2), 0)] for r in range(2)]
    assert sizes[0] == sizes[1]
    assert set(sizes[0]) == {32, 48}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_val_sees_every_sample_exactly_once(synth, world):
    cfg = data_cfg(synth)
    keys, counts = [], set()
    for rank in range(world):
        stream = ValStream(cfg, rank=rank, world_size=world)
        batches = list(stream)
        assert len(batches) == len(stream) and not any(b["pad"] for b in batches)
        for b in batches:
            assert b["image"].dtype == torch.uint8 and b["image"].shape == (len(b["key"]), 3, 48, 48)
            assert [tuple(m.shape) for m in b["masks"]] == [(64, 64)] * len(b["key"]), "masks keep their stored size"
        keys += [k for b in batches for k in b["key"]]
        padded = ValStream(cfg, rank=rank, world_size=world, pad_to_equal=True)
        counts.add(len(padded))
        pads = [b for b in padded if b["pad"]]
        assert len(pads) == len(padded) - len(batches)
        assert all(b["key"] == [] and b["masks"] == [] and b["image"].shape == (1, 3, 48, 48) for b in pads)
    assert sorted(keys) == [f"val_{i:06d}" for i in range(VAL)]
    assert len(counts) == 1, "with padding every rank makes the same number of forward passes"


def test_to_model_input_normalises_with_imagenet_statistics():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    x = to_model_input(images, "cpu", channels_last=True)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    expected = F.normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(x, expected, atol=1e-5)
    assert to_model_input(images, "cpu", channels_last=False).is_contiguous()
    masks = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.allclose(to_target(masks, "cpu"), torch.tensor([0, 128 / 255, 1.0]).view(1, 1, 1, 3))
