"""Sample-level behaviour on hand-made shards (written by salnet's own ShardWriter): image/mask
alignment through the augmentation, corrupt samples under both data.on_error policies, resume
past a corrupt sample without decoding it, and val masks at their stored, non-square size."""

import io
import logging
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from salnet.config import DataConfig
from salnet.data import IMAGENET_MEAN, IMAGENET_STD, DataError, TrainInput, TrainStream, ValStream
from salnet.shards.writer import Sample, ShardWriter

H, W = 48, 80  # not square: a transposed or unrotated mask would not even have the image's shape
RED, BLUE = (230, 20, 20), (20, 20, 200)


def painted_scene() -> tuple[np.ndarray, np.ndarray]:
    """A blue image with a red L-shaped object (asymmetric, off-centre); the mask is exactly the red."""
    mask = np.zeros((H, W), np.uint8)
    mask[8:40, 10:22] = 255
    mask[28:40, 10:50] = 255
    image = np.empty((H, W, 3), np.uint8)
    image[:] = BLUE
    image[mask > 0] = RED
    return image, mask


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def scene_sample(key: str, image_bytes: bytes | None = None) -> Sample:
    image, mask = painted_scene()
    meta = {
        "key": key,
        "dataset": "painted",
        "source": key,
        "mask_source": key,
        "orig_size": [H, W],
        "stored_size": [H, W],
    }
    return Sample(
        key=key,
        image_ext="png",
        image=png(image) if image_bytes is None else image_bytes,
        mask=png(mask),
        meta=meta,
        foreground=float((mask > 0).mean()),
        soft_mask=False,
    )


class MasklessSample(Sample):
    """A sample whose KEY.mask.png member is missing from the tar."""

    def members(self):
        return [(name, data) for name, data in super().members() if not name.endswith(".mask.png")]


def write_set(out_dir: Path, samples: list[Sample], shard_samples: int) -> str:
    with ShardWriter(out_dir, "painted", shard_samples=shard_samples, shard_bytes=None) as writer:
        for sample in samples:
            writer.add(sample)
        writer.finish(layout="test", command="tests/test_data_samples.py", skipped=[])
    return str(out_dir)


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    return write_set(
        tmp_path_factory.mktemp("painted"), [scene_sample(f"s{i:02d}") for i in range(12)], shard_samples=5
    )


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    # One shard of 10 in tar order: s02 has bytes that are no image, s07 lacks its mask member.
    samples = [scene_sample(f"s{i:02d}") for i in range(10)]
    samples[2] = scene_sample("s02", image_bytes=b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    samples[7] = MasklessSample(**{**vars(scene_sample("s07"))})
    return write_set(tmp_path_factory.mktemp("corrupt"), samples, shard_samples=10)


def cfg_for(train: str, **overrides) -> DataConfig:
    values = dict(
        train=[train], val=[train], size=32, eval_size=40, batch_size=2, eval_batch_size=4, workers=1, shuffle_buffer=1
    )
    return DataConfig(**{**values, **overrides})


def uniform_neighbourhood(region: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels whose whole (2r+1)^2 neighbourhood lies in the frame and in `region` (bool [H, W]): away
    from object edges, where interpolated image and mask pixels may legitimately mix both sides."""
    share = torch.nn.functional.avg_pool2d(
        region.float()[None, None], 2 * radius + 1, stride=1, padding=radius, count_include_pad=True
    )
    return share[0, 0] == 1


@pytest.mark.parametrize("augment_on", ["worker", "device"])
def test_image_and_mask_stay_aligned_through_the_augmentation(painted, augment_on):
    cfg = cfg_for(painted, augment_on=augment_on, augment={"scale": [0.3, 1.0], "rotate_deg": 30, "color_jitter": 0.2})
    stream = TrainStream(cfg, seed=0, rank=0, world_size=1)
    adjust_input = TrainInput(cfg, "cpu", channels_last=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    masks, checked, soft = [], 0, 0
    for epoch in range(3):
        for batch in stream.epoch_batches(epoch):
            assert ("extent" in batch) == (augment_on == "device"), "the workers augment in exactly one mode"
            images, targets = adjust_input(batch)
            for image, mask in zip(images, targets[:, 0]):
                assert image.shape[-2:] == mask.shape == (32, 32)
                assert 0 <= mask.min() and mask.max() <= 1, "a mask value left [0, 1]"
                rgb = image * std + mean  # back to 0..1; red (230, 20, 20) and blue (20, 20, 200) are far apart
                red = rgb[0] > rgb[2] + 0.2
                inside, outside = uniform_neighbourhood(mask > 0.999), uniform_neighbourhood(mask < 0.001)
                assert red[inside].all(), "mask pixels whose image pixel is not the object's red"
                assert not red[outside].any(), "object-red image pixels outside the mask"
                checked += int(inside.sum() + outside.sum())
                soft += int(((mask > 0.01) & (mask < 0.99)).sum())
                masks.append(mask)
    assert checked > 0.4 * len(masks) * 32 * 32
    assert soft > 0, "edges are resampled bilinearly (values between 0 and 1), not snapped to the nearest pixel"
    assert len({m.numpy().tobytes() for m in masks}) > len(masks) // 2, "the 12 identical scenes were barely augmented"


def test_val_masks_keep_their_stored_size_and_images_take_the_eval_size(painted):
    batches = list(ValStream(cfg_for(painted), rank=0, world_size=1))
    assert sum(len(b["key"]) for b in batches) == 12
    for b in batches:
        assert b["image"].shape == (len(b["key"]), 3, 40, 40)
        assert all(tuple(m.shape) == (H, W) and m.dtype == torch.uint8 for m in b["masks"])
        assert torch.equal(b["masks"][0], torch.from_numpy(painted_scene()[1]))


def test_on_error_error_stops_naming_shard_and_key(corrupt):
    before = set(multiprocessing.active_children())
    # Two readers: s00-s05 make batches 0, 2, 4 and s06-s09 batches 1, 3, so batch 1 (with s07) fails first.
    stream = TrainStream(cfg_for(corrupt, on_error="error", workers=2), seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"painted-000000\.tar, sample 's07' \(#7\): no mask member"):
        list(stream.epoch_batches(0))
    val = ValStream(cfg_for(corrupt, on_error="error"), rank=0, world_size=1)
    with pytest.raises(DataError, match=r"painted-000000\.tar, sample 's02' \(#2\): member KEY\.png: corrupt PNG"):
        list(val)
    # The failed streams go, and their loader workers with them, as soon as nothing refers to them:
    # no reference cycle keeps them for the garbage collector, whose shutdown of a loader it finds
    # takes 10 s per worker (and would be charged to a later test).
    del stream, val
    assert set(multiprocessing.active_children()) <= before, "a failed pass left its loader workers running"


@pytest.mark.parametrize("world", [1, 2])
def test_on_error_skip_counts_logs_and_keeps_batches_and_steps_equal(corrupt, world, caplog):
    cfg = cfg_for(corrupt, on_error="skip", workers=2)
    skipped, keys = [], []
    with caplog.at_level(logging.WARNING, logger="salnet.data"):
        for rank in range(world):
            stream = TrainStream(cfg, seed=0, rank=rank, world_size=world)
            batches = list(stream.epoch_batches(0))
            assert len(batches) == stream.steps_per_epoch == (10 // world) // 2
            assert all(len(b["key"]) == 2 and b["image"].shape[0] == 2 for b in batches)
            skipped += stream.skipped
            keys += [k for b in batches for k in b["key"]]
    assert sorted(m.split("'")[1] for m in skipped) == ["s02", "s07"]
    assert "s02" not in keys and "s07" not in keys
    assert "corrupt sample(s) skipped" in caplog.text and "'s07' (#7): no mask member" in caplog.text

    val = ValStream(cfg, rank=0, world_size=1)
    val_keys = [k for b in val for k in b["key"]]
    assert sorted(val_keys) == [f"s{i:02d}" for i in range(10) if i not in (2, 7)]
    assert len(val.skipped) == 2


def test_resume_passes_over_consumed_samples_without_decoding_them(corrupt):
    # shuffle_buffer=1 and one reader: the tar order from the epoch's random start (plan.pieces).
    # An epoch where s02 is in the first two batches and s07 in the fourth, after a clean third:
    skipping = TrainStream(cfg_for(corrupt, on_error="skip"), seed=0, rank=0, world_size=1)

    def batches_of(epoch):
        order = [f"s{i:02d}" for p in skipping.plan.pieces(epoch) for i in range(p.start, p.stop)]
        return [order[k : k + 2] for k in range(0, len(order), 2)]

    epoch = next(e for e in range(100) if "s02" in batches_of(e)[0] + batches_of(e)[1] and "s07" in batches_of(e)[3])
    for taken, _ in enumerate(skipping.epoch_batches(epoch), start=1):
        if taken == 2:
            break
    assert [m.split("'")[1] for m in skipping.skipped] == ["s02"]
    state = skipping.state_dict()

    strict = TrainStream(cfg_for(corrupt, on_error="error"), seed=0, rank=0, world_size=1)
    strict.load_state_dict(state)
    batches = strict.epoch_batches(epoch)
    assert next(batches)["key"] == batches_of(epoch)[2], "s02 was consumed before the checkpoint: never decoded again"
    with pytest.raises(DataError, match="'s07'"):
        next(batches)
