"""The training augmentation (salnet.data.augment) in both places it runs (data.augment_on):
its geometry against torchvision's, the same parameter distributions in a worker and on the
device (measured from what comes out of the real streams), and the device side's determinism and
exact resume (per rank; through a checkpoint of a real 2-rank DDP run in
test_train.py's bitwise resume test)."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from test_data_samples import png, write_set
from torchvision.transforms import InterpolationMode

from salnet.config import AugmentConfig, DataConfig, load_config
from salnet.data import IMAGENET_MEAN, IMAGENET_STD, TrainInput, TrainStream
from salnet.data.augment import (
    Box,
    Warp,
    augment_sample,
    crop_box,
    cut,
    draw_warp,
    jitter,
    pad_crops,
    resolve_augment_on,
    warp_batch,
)
from salnet.shards.writer import Sample


def warp_of(flip=(False,), angle=(0.0,), colour=None) -> Warp:
    return Warp(
        torch.tensor(flip),
        torch.tensor(angle, dtype=torch.float32),
        None if colour is None else torch.tensor(colour, dtype=torch.float32),
    )


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 [3, h, w] without pixel-level noise (so bilinear taps that differ by rounding agree closely)."""
    noise = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return TF.gaussian_blur(noise, [9, 9], [3.0, 3.0])


# --------------------------------------------------------------------------------------------
# Geometry and colour against torchvision
# --------------------------------------------------------------------------------------------


def test_rotation_and_flip_are_torchvisions():
    image, mask = smooth_image(64, 64), smooth_image(64, 64, seed=1)[:1]
    full = torch.tensor([[64, 64]])
    rotated, rotated_mask = warp_batch(image[None], mask[None], full, 64, warp_of(angle=(30.0,)))
    # torchvision: counter-clockwise about the centre, bilinear, zero fill; the same in the interior
    # (the rim differs only by where the zero fill starts blending)
    expected = TF.rotate(torch.cat([image, mask]).float(), 30.0, interpolation=InterpolationMode.BILINEAR)
    assert torch.allclose(torch.cat([rotated, rotated_mask], 1)[0, :, 8:-8, 8:-8], expected[:, 8:-8, 8:-8], atol=1e-3)
    flipped, _ = warp_batch(image[None], mask[None], full, 64, warp_of(flip=(True,)))
    assert torch.equal(flipped[0], image.flip(-1).float())
    same, same_mask = warp_batch(image[None], mask[None], full, 64, warp_of())
    assert torch.equal(same[0], image.float()) and torch.equal(same_mask[0], mask.float())


def test_scaling_a_crop_matches_a_resize_and_never_reads_outside_it():
    image = smooth_image(40, 60)
    crop = image[:, 5:35, 10:50]  # 30 x 40, to 48 x 48: upscaled
    out, mask = warp_batch(
        crop[None], torch.full((1, 1, 30, 40), 255, dtype=torch.uint8), torch.tensor([[30, 40]]), 48, warp_of()
    )
    # half-pixel alignment would blend the rim 19% with the padding (mask 207 there)
    assert mask.min() > 254.99, "an upscaled crop's rim read the zero padding"
    resized = TF.resize(crop.float(), [48, 48], antialias=False)  # half-pixel alignment: 0.4% of a pixel apart here
    assert (out[0] - resized).abs().mean() < 1.0


def test_a_padded_batch_warps_as_the_bare_crops_do():
    # crops zero-padded into one batch (augment_on=device) and each bare crop on its own: the same
    # warp, so the same pixels up to float rounding.
    image, mask = smooth_image(70, 90), smooth_image(70, 90, seed=2)[:1]
    boxes = [Box(3, 7, 50, 61), Box(10, 0, 60, 90), Box(0, 30, 41, 35)]
    crops = [cut(image, mask, box, 48) for box in boxes]
    warp = warp_of(
        flip=(True, False, True), angle=(12.0, -7.5, 29.0), colour=[[1.1, 0.9, 1.2], [0.8, 1.15, 0.9], [1.0, 1.0, 1.0]]
    )
    images, masks, extent = pad_crops([c[0] for c in crops], [c[1] for c in crops])
    assert images.shape == (3, 3, 60, 90) and extent.tolist() == [[50, 61], [60, 90], [41, 35]]
    batch_image, batch_mask = warp_batch(images, masks, extent, 48, warp)
    for i, (crop_image, crop_mask) in enumerate(crops):
        bare_image, bare_mask = warp_batch(
            crop_image[None], crop_mask[None], extent[i : i + 1], 48, warp.select(slice(i, i + 1))
        )
        assert torch.allclose(batch_image[i], bare_image[0], atol=0.01) and torch.allclose(
            batch_mask[i], bare_mask[0], atol=0.01
        )


def test_the_workers_uint8_warp_and_jitter_match_the_devices_float_ones():
    # augment_on=worker runs the same maps through OpenCV in uint8: within rounding and OpenCV's
    # 1/32-pixel fixed point of the float path (largest where a rotated edge meets the zero fill).
    image, mask = smooth_image(70, 90), smooth_image(70, 90, seed=2)[:1]
    boxes = [Box(3, 7, 50, 61), Box(10, 0, 60, 90), Box(0, 30, 41, 35)]
    warp = warp_of(
        flip=(True, False, True), angle=(12.0, -7.5, 29.0), colour=[[1.1, 0.9, 1.2], [0.8, 1.15, 0.9], [1.0, 1.0, 1.0]]
    )
    for i, box in enumerate(boxes):
        crop_image, crop_mask = cut(image, mask, box, 48)
        one = warp.select(slice(i, i + 1))
        out_image, out_mask = torch.empty(3, 48, 48, dtype=torch.uint8), torch.empty(1, 48, 48, dtype=torch.uint8)
        augment_sample(crop_image, crop_mask, one, out_image, out_mask)
        ref_image, ref_mask = warp_batch(crop_image[None], crop_mask[None], torch.tensor([box[2:]]), 48, one)
        for out, ref in ((out_image, ref_image[0]), (out_mask, ref_mask[0])):
            diff = (out.float() - ref).abs()
            assert diff.max() <= 4 and diff.mean() < 0.6, (i, diff.max(), diff.mean())


def test_colour_jitter_is_torchvisions_brightness_contrast_saturation():
    # Away from clipping the three operations commute, so one colour map equals them in any order.
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 100 + 60
    factors = [(1.15, 0.85, 1.2), (0.8, 1.2, 0.9)]
    out = jitter(images.clone(), torch.tensor(factors))
    for image, result, (b, c, s) in zip(images / 255, out, factors):
        for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
            expected = image
            for op in order:
                fn, factor = [(TF.adjust_brightness, b), (TF.adjust_contrast, c), (TF.adjust_saturation, s)][op]
                expected = fn(expected, factor)
            assert torch.allclose(result / 255, expected, atol=1e-5)
    assert torch.allclose(jitter(images.clone(), torch.ones(2, 3)), images)
    assert jitter(torch.full((1, 3, 4, 4), 250.0), torch.tensor([[1.2, 1.0, 1.0]])).max() == 255, "clamped"


def test_a_crop_twice_the_size_or_more_is_box_reduced_first():
    image = torch.arange(4 * 6, dtype=torch.uint8).view(1, 4, 6).repeat(3, 1, 1) * 10
    mask = torch.full((1, 4, 6), 255, dtype=torch.uint8)
    small_image, small_mask = cut(image, mask, Box(0, 0, 4, 6), size=2)  # factors 2 x 3: means of 2 x 3 blocks
    assert small_image.shape == (3, 2, 2) and small_image.dtype == torch.uint8
    assert small_image[0].tolist() == [[40, 70], [160, 190]]  # e.g. 10 x mean(0, 1, 2, 6, 7, 8) = 40
    assert torch.equal(small_mask, torch.full((1, 2, 2), 255, dtype=torch.uint8))
    view_image, _ = cut(image, mask, Box(1, 2, 3, 3), size=2)  # less than twice: a view, no resampling
    assert view_image.data_ptr() == image[:, 1:, 2:].data_ptr() and view_image.shape == (3, 3, 3)


def test_augment_on_defaults_to_the_device_on_cuda_and_to_the_worker_elsewhere():
    assert resolve_augment_on(DataConfig(), "cpu") == "worker"
    assert resolve_augment_on(DataConfig(), torch.device("cuda", 1)) == "device"
    assert resolve_augment_on(DataConfig(augment_on="device"), "cpu") == "device"
    assert resolve_augment_on(DataConfig(augment_on="worker"), "cuda") == "worker"
    with pytest.raises(ValueError, match=r"data\.augment_on.*'gpu'.*'worker', 'device'"):
        load_config(None, ["data.augment_on=gpu"])


# --------------------------------------------------------------------------------------------
# The same parameter distributions in both modes, measured on what the real pipeline outputs
# --------------------------------------------------------------------------------------------

H, W, S, N = 60, 90, 32, 128  # scenes of H x W (not square), trained at S, N samples per mode


def set_of(tmp_path, name: str, rgb: np.ndarray, count: int) -> str:
    mask = np.full(rgb.shape[:2], 255, np.uint8)
    meta = {"dataset": name, "orig_size": list(rgb.shape[:2]), "stored_size": list(rgb.shape[:2])}
    samples = [
        Sample(
            key=f"{name}{i:03d}",
            image_ext="png",
            image=png(rgb),
            mask=png(mask),
            meta={**meta, "key": f"{name}{i:03d}", "source": "probe", "mask_source": "probe"},
            foreground=1.0,
            soft_mask=False,
        )
        for i in range(count)
    ]
    (tmp_path / name).mkdir()
    return write_set(tmp_path / name, samples, shard_samples=64)


def outputs(shards: str, augment_on: str, augment: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image float [3, S, S] in 0..255, mask float [S, S] in 0..1) of N samples, as the training step gets them."""
    cfg = DataConfig(
        train=[shards], val=[shards], size=S, batch_size=16, workers=0, augment_on=augment_on, augment=augment
    )
    adjust_input = TrainInput(cfg, "cpu", channels_last=False, seed=5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for batch in TrainStream(cfg, seed=0, rank=0, world_size=1).epoch_batches(0):
        images, targets = adjust_input(batch)
        out += [((image * std + mean) * 255, target[0]) for image, target in zip(images, targets)]
    assert len(out) == N
    return out


def geometry(image: torch.Tensor, mask: torch.Tensor) -> dict:
    """The sample's flip, angle and crop box, read back from a probe whose red and green channels are
    the source's x and y: a least-squares fit of source position against output position."""
    full = torch.nn.functional.avg_pool2d((mask > 0.999).float()[None, None], 5, stride=1, padding=2)[0, 0] == 1
    ys, xs = torch.nonzero(full, as_tuple=True)
    design = torch.stack([xs.double(), ys.double(), torch.ones_like(xs, dtype=torch.float64)], 1)
    source = torch.stack([image[0][full] * W / 255, image[1][full] * H / 255], 1).double()  # source px (+0.5)
    (lx1, ly1), (lx2, ly2) = torch.linalg.lstsq(design, source).solution[:2].tolist()
    kx, ky = math.hypot(lx1, lx2), math.hypot(ly1, ly2)  # source px per output px: (w - 1) / (S - 1)
    width, height = kx * (S - 1) + 1, ky * (S - 1) + 1
    return {
        "flip": lx1 * ly2 - lx2 * ly1 < 0,
        "angle": math.degrees(math.atan2(ly1, ly2)),
        "area": width * height / (W * H),
        "log_ratio": math.log(width / height),
    }


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probes")
    yy, xx = np.mgrid[0:H, 0:W]
    ramps = np.stack([(xx + 0.5) * 255 / W, (yy + 0.5) * 255 / H, np.full((H, W), 128.0)], -1).round().astype(np.uint8)
    flat = np.empty((40, 40, 3), np.uint8)
    flat[:] = (110, 130, 150)  # away from clipping at any jitter of strength 0.2
    return {"ramps": set_of(tmp, "ramps", ramps, N), "flat": set_of(tmp, "flat", flat, N)}


def test_both_modes_draw_the_same_crops_flips_and_angles(probes):
    augment = {"scale": [0.3, 1.0], "rotate_deg": 30, "hflip": True, "color_jitter": 0}
    stats = {
        mode: [geometry(*sample) for sample in outputs(probes["ramps"], mode, augment)] for mode in ("worker", "device")
    }
    summary = {}
    for mode, samples in stats.items():
        angles = torch.tensor([s["angle"] for s in samples])
        areas = torch.tensor([s["area"] for s in samples])
        ratios = torch.tensor([s["log_ratio"] for s in samples])
        summary[mode] = {
            "flips": sum(s["flip"] for s in samples) / N,
            "angle_mean": angles.mean().item(),
            "angle_std": angles.std().item(),
            "area_mean": areas.mean().item(),
        }
        # each mode on its own: the configured distributions (uniform angle in +-30: std 17.3)
        assert 0.35 < summary[mode]["flips"] < 0.65, summary
        assert angles.abs().max() < 30.5 and angles.abs().max() > 25, summary
        assert abs(summary[mode]["angle_mean"]) < 4.5 and 14 < summary[mode]["angle_std"] < 21, summary
        assert areas.min() > 0.28 and areas.max() < 1.02 and ratios.abs().max() < math.log(4 / 3) + 0.03, summary
    # and against each other: the workers cut the same boxes in both modes; flips and angles come
    # from different generators, with the same distributions
    assert abs(summary["worker"]["area_mean"] - summary["device"]["area_mean"]) < 0.01, summary
    assert abs(summary["worker"]["flips"] - summary["device"]["flips"]) < 0.2, summary
    assert abs(summary["worker"]["angle_mean"] - summary["device"]["angle_mean"]) < 6, summary
    assert abs(summary["worker"]["angle_std"] - summary["device"]["angle_std"]) < 4, summary


def test_both_modes_draw_the_same_colour_jitter(probes):
    augment = {"scale": [1.0, 1.0], "rotate_deg": 0, "hflip": False, "color_jitter": 0.2}
    x = torch.tensor([110.0, 130.0, 150.0])
    grey = float(torch.tensor([0.2989, 0.587, 0.114]) @ x)
    summary = {}
    for mode in ("worker", "device"):
        colours = torch.stack([image.mean((1, 2)) for image, _ in outputs(probes["flat"], mode, augment)])
        # out = b * (c * s * (x - grey) + grey): the brightness factor scales the grey level,
        # contrast x saturation the spread between channels
        b = colours @ torch.tensor([0.2989, 0.587, 0.114]) / grey
        cs = (colours[:, 2] - colours[:, 0]) / (b * (x[2] - x[0]))
        summary[mode] = {"b_mean": b.mean().item(), "cs_mean": cs.mean().item(), "b_std": b.std().item()}
        assert 0.79 < b.min() and b.max() < 1.21 and b.max() - b.min() > 0.3, summary  # uniform in [0.8, 1.2]
        assert 0.63 < cs.min() and cs.max() < 1.45, summary  # a product of two such factors
        assert abs(summary[mode]["b_mean"] - 1) < 0.04 and abs(summary[mode]["cs_mean"] - 1) < 0.06, summary
    assert abs(summary["worker"]["b_mean"] - summary["device"]["b_mean"]) < 0.04, summary
    assert abs(summary["worker"]["b_std"] - summary["device"]["b_std"]) < 0.03, summary


# --------------------------------------------------------------------------------------------
# Determinism and exact resume of the device-side draws
# --------------------------------------------------------------------------------------------


def test_device_side_draws_are_per_rank_deterministic_and_resume_exactly(probes):
    cfg = DataConfig(train=[probes["ramps"]], size=S, batch_size=16, workers=0, augment_on="device")
    batches = list(TrainStream(cfg, seed=0, rank=0, world_size=1).epoch_batches(0))[:4]
    assert all("extent" in batch for batch in batches)

    def run(adjust_input, todo):
        return [adjust_input(batch) for batch in todo]

    reference = run(TrainInput(cfg, "cpu", channels_last=True, seed=3, rank=1), batches)
    again = TrainInput(cfg, "cpu", channels_last=True, seed=3, rank=1)
    first = run(again, batches[:2])
    state = again.state_dict()
    resumed = TrainInput(cfg, "cpu", channels_last=True, seed=3, rank=1)
    resumed.load_state_dict(state)
    for (image, target), (ref_image, ref_target) in zip(first + run(resumed, batches[2:]), reference):
        assert torch.equal(image, ref_image) and torch.equal(target, ref_target)
        assert image.is_contiguous(memory_format=torch.channels_last)
    other_rank = run(TrainInput(cfg, "cpu", channels_last=True, seed=3, rank=0), batches[:1])
    assert not torch.equal(other_rank[0][0], reference[0][0]), "two ranks drew the same flips, angles and colours"


def test_draws_come_from_the_generator_given_or_the_global_one():
    aug = AugmentConfig(rotate_deg=10, color_jitter=0.2)
    a, b = (draw_warp(8, aug, torch.Generator().manual_seed(1)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip((a.flip, a.angle, a.colour), (b.flip, b.angle, b.colour)))
    torch.manual_seed(1)
    box = crop_box(torch.zeros(3, 50, 80), aug)
    assert (
        0.75 * 50 * 80 - 200 <= box.height * box.width <= 50 * 80
        and box.top + box.height <= 50
        and box.left + box.width <= 80
    )
    assert draw_warp(4, AugmentConfig(hflip=False, rotate_deg=0, color_jitter=0)).colour is None
