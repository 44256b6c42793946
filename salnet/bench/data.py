"""`python -m salnet.bench data`: the train loader in both augmentation modes against a PIL
map-style loader and the decode limit, and what each stage costs a CPU core.

Makes N synthetic scenes (salnet.shards.synth, JPEG + PNG mask), then, in each repeat (the
contenders interleaved), measures steady-state samples/s (first batch to last, so worker start-up
is not counted) with W workers of:

  worker  salnet's TrainStream, data.augment_on=worker: workers decode, cut the random crop box,
          warp it once (scale, flip, rotation) and jitter its colours in uint8 (OpenCV), to the training size
  device  salnet's TrainStream, data.augment_on=device: workers decode and cut the crop box only;
          the warp and the jitter are the training device's (not part of this rate)
  pil     a plain map-style Dataset over the same samples as loose .jpg/.png files, decoded with
          PIL and augmented by the transforms.v2 pipeline salnet's workers ran before the fused
          warp (RandomResizedCrop, flip, RandomRotation, ColorJitter), W workers
  decode  the decode limit: torchvision decoding the same bytes (held in memory), no augmentation,
          W workers

and, on one core in this process (per sample, a batch at a time): what a worker does in each mode
(`worker_cpu_ms_per_sample`), decoding alone (`decode_cpu_ms_per_sample`), and the augmentation
after the cut: salnet's device side run on the CPU (TrainInput on a batch of cut crops: warp,
jitter, normalisation) against the v2 pipeline per sample plus the normalisation of its batch
(what the same work cost before). It also times skipping S samples on resume: time to the first
batch of a TrainStream resumed after S consumed samples, minus the same for a fresh epoch start,
both with one in-process reader (no worker start-up noise, and one reader skips all S samples: the
worst case; W workers each skip S / W in parallel), on a shard set of >= S samples (the scenes
repeated under new keys); and profiles one sample's decode and each augmentation stage on one core.
Medians of the repeats; the last line is one JSON object.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from salnet.bench._harness import emit, interleaved, machine, medians, parser, ratio, timed
from salnet.config import AugmentConfig, DataConfig
from salnet.data import TrainInput, TrainStream, to_model_input, to_target
from salnet.data.augment import augment_sample, crop_box, cut, draw_warp, jitter, pad_crops, warp_batch
from salnet.data.reader import RawSample, read_shard
from salnet.data.sources import open_shard_set
from salnet.data.transforms import decode_sample, normalise
from salnet.shards.format import JPEG_EXT, MASK_EXT, META_EXT
from salnet.shards.parallel import available_cpus
from salnet.shards.synth import synthesize
from salnet.shards.writer import Sample, ShardWriter

MODES = ("worker", "device")
TARGETS = {
    "loader_over_pil": 1.3,
    "loader_over_decode": {"worker": 0.4, "device": 0.75},
    "device_augment_over_v2": 1.0,
    "resume_skip_s": 1.0,
}
THROUGHPUT = (*MODES, "pil", "decode")  # contenders measured in samples/s with W workers
ONE_CORE = (
    "decode_cpu",
    "worker_cpu_worker",
    "worker_cpu_device",
    "device_augment_cpu",
    "v2_augment_cpu",
)  # ms per sample


def main(argv: list[str]) -> None:
    cli = parser(
        "data",
        __doc__,
        samples=(512, "scenes in the throughput set"),
        workers="loader worker processes for every contender",
    )
    cli.add_argument(
        "--image-size", type=int, default=400, help="side of the stored scenes in pixels (default 400, like DUTS)"
    )
    cli.add_argument("--size", type=int, default=352, help="training size in pixels (default 352)")
    cli.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    cli.add_argument("--skip", type=int, default=10_000, help="samples consumed before the resume (default 10000)")
    args = cli.parse_args(argv)
    # One thread, as in a DataLoader worker: the in-process parts (one-core costs, resume skip,
    # profile) would otherwise time torch's intra-op threads fighting over the cores.
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="salnet-bench-data-") as tmp:
        started = time.perf_counter()
        train_dir, _ = synthesize(
            Path(tmp) / "synth", train=args.samples, val=1, size=args.image_size, workers=available_cpus()
        )
        raws = [
            raw for shard in open_shard_set(str(train_dir)).shards for raw in read_shard(shard, range(shard.samples))
        ]
        loose = _write_loose(Path(tmp) / "loose", raws)
        skip_dir = _write_repeated(
            Path(tmp) / "repeated", raws, samples=(math.ceil(args.skip / args.batch) + 1) * args.batch
        )
        print(
            f"made {args.samples} scenes of {args.image_size} px ({_mean_kib(raws):.0f} KiB per JPEG) and a {args.skip}+ sample "
            f"resume set in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )

        cfg = {
            mode: DataConfig(
                train=[str(train_dir)], size=args.size, batch_size=args.batch, workers=args.workers, augment_on=mode
            )
            for mode in MODES
        }
        streams = {mode: TrainStream(cfg[mode], seed=0, rank=0, world_size=1, device="cpu") for mode in MODES}
        pil = DataLoader(
            _LoosePIL(loose, cfg["worker"]),
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            persistent_workers=True,
        )
        decode = DataLoader(
            _DecodeOnly(raws),
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            persistent_workers=True,
        )
        skip_cfg = DataConfig(train=[str(skip_dir)], size=args.size, batch_size=args.batch, workers=0)
        consumed_batches = math.ceil(args.skip / args.batch)
        one_core = _one_core_contenders(streams, cfg, raws[: args.batch], args.size)

        def describe(latest: dict[str, float]) -> str:
            return (
                ", ".join(f"{name} {latest[name]:.0f} samples/s" for name in THROUGHPUT)
                + "; one core, ms per sample: "
                + ", ".join(f"{name} {latest[name]:.2f}" for name in ONE_CORE)
                + f"; first batch fresh {latest['fresh']:.2f} s, resumed {latest['resumed']:.2f} s"
            )

        _first_batch_s(skip_cfg, None)  # warm-up: the first batch of a process also pays one-time kernel set-up
        runs = interleaved(
            args.repeats,
            {
                **{
                    mode: lambda repeat, mode=mode: _steady_rate(streams[mode].epoch_batches(repeat), args.batch)
                    for mode in MODES
                },
                "pil": lambda _: _steady_rate(iter(pil), args.batch),
                "decode": lambda _: _steady_rate(iter(decode), args.batch),
                **one_core,
                "fresh": lambda _: _first_batch_s(skip_cfg, None),
                "resumed": lambda _: _first_batch_s(skip_cfg, consumed_batches),
            },
            describe,
        )
        profile = _profile_one_sample(raws[0], cfg["worker"])

    median = medians(runs)
    rate = {name: median[name] for name in THROUGHPUT}
    skip_s = median["resumed"] - median["fresh"]
    over_decode = {mode: ratio(rate[mode], rate["decode"]) for mode in MODES}
    augment_ratio = ratio(median["device_augment_cpu"], median["v2_augment_cpu"])
    result = {
        "benchmark": "data",
        "samples": args.samples,
        "image_size": args.image_size,
        "size": args.size,
        "batch": args.batch,
        "workers": args.workers,
        "repeats": args.repeats,
        **machine(),
        "loader_samples_per_s": {mode: round(rate[mode], 1) for mode in MODES},
        "pil_map_style_samples_per_s": round(rate["pil"], 1),
        "decode_limit_samples_per_s": round(rate["decode"], 1),
        "loader_over_pil": {mode: ratio(rate[mode], rate["pil"]) for mode in MODES},
        "loader_over_decode": over_decode,
        "worker_cpu_ms_per_sample": {mode: round(median[f"worker_cpu_{mode}"], 2) for mode in MODES},
        "decode_cpu_ms_per_sample": round(median["decode_cpu"], 2),
        "augment_cpu_ms_per_sample": {
            "device_side_batch": round(median["device_augment_cpu"], 2),
            "v2_per_sample": round(median["v2_augment_cpu"], 2),
        },
        "device_augment_over_v2": augment_ratio,
        "resume_skip_samples": consumed_batches * args.batch,
        "resume_skip_s": round(skip_s, 3),
        "first_batch_fresh_s": round(median["fresh"], 3),
        "first_batch_resumed_s": round(median["resumed"], 3),
        "one_core_ms_per_sample": profile,
        "targets": TARGETS,
        "meets_targets": {
            "loader_over_pil": rate["worker"] / rate["pil"] >= TARGETS["loader_over_pil"],
            "loader_over_decode": {mode: over_decode[mode] >= TARGETS["loader_over_decode"][mode] for mode in MODES},
            "device_augment_over_v2": augment_ratio < TARGETS["device_augment_over_v2"],
            "resume_skip_s": skip_s < TARGETS["resume_skip_s"],
        },
    }
    print(
        f"loader {rate['worker']:.0f} samples/s (augment_on=worker), {rate['device']:.0f} samples/s (augment_on=device), "
        f"PIL map-style {rate['pil']:.0f} samples/s, decode limit {rate['decode']:.0f} samples/s ({args.workers} workers each): "
        f"loader/decode {over_decode['worker']:.2f}x worker (target {TARGETS['loader_over_decode']['worker']}x), "
        f"{over_decode['device']:.2f}x device (target {TARGETS['loader_over_decode']['device']}x); loader/PIL "
        f"{result['loader_over_pil']['worker']:.2f}x (target {TARGETS['loader_over_pil']}x)"
    )
    print(
        f"one core, ms per sample: worker {result['worker_cpu_ms_per_sample']}, decode {result['decode_cpu_ms_per_sample']}; "
        f"augmentation after the cut: device side on the CPU {median['device_augment_cpu']:.2f} vs v2 per sample "
        f"{median['v2_augment_cpu']:.2f} ({augment_ratio:.2f}x, target < {TARGETS['device_augment_over_v2']}x); skipping "
        f"{result['resume_skip_samples']} samples on resume costs {skip_s:.2f} s (target < {TARGETS['resume_skip_s']} s)"
    )
    print(f"one core, ms per sample and stage: {profile}")
    emit(result)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _mean_kib(raws: list[RawSample]) -> float:
    return statistics.fmean(len(r.members[JPEG_EXT]) for r in raws) / 1024


def _write_loose(out: Path, raws: list[RawSample]) -> list[tuple[Path, Path]]:
    out.mkdir(parents=True)
    pairs = []
    for raw in raws:
        image, mask = out / f"{raw.key}.jpg", out / f"{raw.key}.png"
        image.write_bytes(raw.members[JPEG_EXT])
        mask.write_bytes(raw.members[MASK_EXT])
        pairs.append((image, mask))
    return pairs


def _write_repeated(out: Path, raws: list[RawSample], samples: int) -> Path:
    """At least `samples` samples in the real shard format: the scenes again and again under new keys."""
    out.mkdir(parents=True)
    with ShardWriter(out, "repeated", shard_samples=256, shard_bytes=None) as writer:
        for index in range(samples):
            raw = raws[index % len(raws)]
            meta = {**json.loads(raw.members[META_EXT]), "key": f"r{index:07d}"}
            writer.add(
                Sample(
                    key=f"r{index:07d}",
                    image_ext=JPEG_EXT,
                    image=raw.members[JPEG_EXT],
                    mask=raw.members[MASK_EXT],
                    meta=meta,
                    foreground=0.0,
                    soft_mask=False,
                )
            )
        writer.finish(layout="bench", command="python -m salnet.bench data", skipped=[])
    return out


# --------------------------------------------------------------------------------------------
# The contenders
# --------------------------------------------------------------------------------------------


def legacy_v2_pipeline(aug: AugmentConfig, size: int) -> v2.Compose:
    """The transforms.v2 pipeline salnet's workers ran before the fused warp (the baseline): crop and
    resize (uint8), flip, then rotation (nearest, zero fill) and colour jitter in float."""
    return v2.Compose(
        [
            v2.RandomResizedCrop((size, size), scale=aug.scale, antialias=True),
            *([v2.RandomHorizontalFlip()] if aug.hflip else []),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            *([v2.RandomRotation(aug.rotate_deg, fill=None)] if aug.rotate_deg > 0 else []),
            *(
                [v2.ColorJitter(brightness=aug.color_jitter, contrast=aug.color_jitter, saturation=aug.color_jitter)]
                if aug.color_jitter > 0
                else []
            ),
            v2.ToDtype({tv_tensors.Image: torch.uint8, "others": None}, scale=True),
        ]
    )


class _LoosePIL(Dataset):
    """The classic SOD loader: one image file and one mask file per sample, PIL, v2 on PIL images."""

    def __init__(self, pairs: list[tuple[Path, Path]], cfg: DataConfig):
        self.pairs, self.pipeline = pairs, legacy_v2_pipeline(cfg.augment, cfg.size)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            # The mask as a tv_tensors.Mask: v2 would colour-jitter a second PIL image as an image.
            image, mask = self.pipeline(
                image.convert("RGB"), tv_tensors.Mask(v2.functional.pil_to_tensor(mask.convert("L")))
            )
        return v2.functional.pil_to_tensor(image), mask.as_subclass(torch.Tensor)


class _DecodeOnly(Dataset):
    def __init__(self, raws: list[RawSample]):
        self.raws = raws

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_sample(self.raws[index])


def _steady_rate(batches: Iterator, batch_size: int) -> float:
    next(batches)  # the clock starts at the first batch: worker start-up and warm-up are not measured
    started, count = time.perf_counter(), 0
    for _ in batches:
        count += 1
    return count * batch_size / (time.perf_counter() - started)


def _first_batch_s(cfg: DataConfig, consumed_batches: int | None) -> float:
    stream = TrainStream(cfg, seed=0, rank=0, world_size=1)
    if consumed_batches is not None:
        stream.load_state_dict({**stream.state_dict(), "epoch": 0, "batches": consumed_batches})
    started = time.perf_counter()
    next(stream.epoch_batches(0))
    return time.perf_counter() - started


def _one_core_contenders(
    streams: dict[str, TrainStream], cfg: dict[str, DataConfig], raws: list[RawSample], size: int
) -> dict[str, Callable[[int], float]]:
    """The in-process measurements, each ms per sample over one batch: a worker's whole job in each
    mode, decoding alone, and the augmentation after the cut in the new (device side, batched) and
    the old (v2, per sample) way."""
    decoded = [decode_sample(raw) for raw in raws]
    cut_batch = streams["device"].worker_batch(0, 0, raws)
    device_side = TrainInput(cfg["device"], "cpu", channels_last=True)
    old = legacy_v2_pipeline(cfg["worker"].augment, size)

    def v2_batch() -> None:
        pairs = [old(tv_tensors.Image(image), tv_tensors.Mask(mask)) for image, mask in decoded]
        to_model_input(torch.stack([image.as_subclass(torch.Tensor) for image, _ in pairs]), "cpu", True)
        to_target(torch.stack([mask.as_subclass(torch.Tensor) for _, mask in pairs]), "cpu")

    def per_sample(fn: Callable[[], object]) -> Callable[[int], float]:
        return lambda _: timed(fn)[1] * 1000 / len(raws)

    return {
        "decode_cpu": per_sample(lambda: [decode_sample(raw) for raw in raws]),
        "worker_cpu_worker": per_sample(lambda: streams["worker"].worker_batch(0, 0, raws)),
        "worker_cpu_device": per_sample(lambda: streams["device"].worker_batch(0, 0, raws)),
        "device_augment_cpu": per_sample(lambda: device_side(cut_batch)),
        "v2_augment_cpu": per_sample(v2_batch),
    }


def _profile_one_sample(raw: RawSample, cfg: DataConfig) -> dict[str, float]:
    """Per-sample cost of each stage on one core (min of repeats: the least disturbed measurement):
    decoding, the device side's stages run on the CPU (pad, warp, jitter, normalise), a worker's
    warp and jitter with data.augment_on=worker (OpenCV, uint8), and each step of the old v2 pipeline."""
    image, mask = decode_sample(raw)
    aug, size = cfg.augment, cfg.size
    torch.manual_seed(0)
    box = crop_box(image, aug)
    crop_image, crop_mask = cut(image, mask, box, size)
    warp = draw_warp(1, aug)
    extent = torch.tensor([list(crop_image.shape[-2:])])
    no_jitter = draw_warp(1, aug.model_copy(update={"color_jitter": 0.0}))
    warped, _ = warp_batch(crop_image[None], crop_mask[None], extent, size, no_jitter)
    outputs = (torch.empty(3, size, size, dtype=torch.uint8), torch.empty(1, size, size, dtype=torch.uint8))
    stages = {
        "decode_torchvision": lambda: decode_sample(raw),
        "decode_pil": lambda: [Image.open(io.BytesIO(raw.members[ext])).load() for ext in (JPEG_EXT, MASK_EXT)],
        "crop_box+cut": lambda: cut(image, mask, crop_box(image, aug), size),
        "pad (batch of 1)": lambda: pad_crops([crop_image], [crop_mask]),
        "warp (grid + grid_sample)": lambda: warp_batch(crop_image[None], crop_mask[None], extent, size, no_jitter),
        "jitter": lambda: jitter(warped.clone(), warp.colour),
        "to uint8": lambda: warped.round().to(torch.uint8),
        "normalise": lambda: normalise(warped[:, :3], channels_last=True),
        "worker warp (OpenCV uint8)": lambda: augment_sample(crop_image, crop_mask, no_jitter, *outputs),
        "worker warp+jitter (OpenCV uint8)": lambda: augment_sample(crop_image, crop_mask, warp, *outputs),
    }
    sample = (tv_tensors.Image(image), tv_tensors.Mask(mask))
    for step in legacy_v2_pipeline(aug, size).transforms:
        name = (
            "v2 "
            + type(step).__name__
            + (f"({step.dtype[tv_tensors.Image]})".replace("torch.", "") if isinstance(step, v2.ToDtype) else "")
        )
        stages[name] = lambda step=step, sample=sample: step(*sample)
        sample = step(*sample)
    return {name: round(_min_ms(fn), 2) for name, fn in stages.items()}


def _min_ms(fn: Callable, calls: int = 20, repeats: int = 5) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1000
