"""`python -m salnet.bench data`: the train loader against a PIL map-style loader and the decode limit.

Makes N synthetic scenes (salnet.shards.synth, JPEG + PNG mask), then, in each repeat, measures
steady-state samples/s (first batch to last, so worker start-up is not counted) of:

  loader  salnet's TrainStream from the shards: W workers, full augmentation (random scale crop,
          flip, rotation, colour jitter) to the training size
  pil     a plain map-style Dataset over the same samples as loose .jpg/.png files, decoded with
          PIL and augmented by the same transforms.v2 pipeline (on PIL images), W workers
  decode  the decode limit: torchvision decoding the same bytes (held in memory), no augmentation,
          W workers

and the time to skip S samples on resume: time to the first batch of a TrainStream resumed after
S consumed samples, minus the same for a fresh epoch start, both with one in-process reader (no
worker start-up noise, and one reader skips all S samples: the worst case; W workers each skip
S / W in parallel), on a shard set of >= S samples (the scenes repeated under new keys). It also profiles one sample's decode and each augmentation step
on one core. Medians of the repeats; the last line is one JSON object.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from salnet.bench._harness import emit, interleaved, machine, medians, parser, ratio
from salnet.config import DataConfig
from salnet.data import TrainStream
from salnet.data.reader import RawSample, read_shard
from salnet.data.sources import open_shard_set
from salnet.data.transforms import TrainAugment, decode_sample
from salnet.shards.format import JPEG_EXT, MASK_EXT, META_EXT
from salnet.shards.parallel import available_cpus
from salnet.shards.synth import synthesize
from salnet.shards.writer import Sample, ShardWriter

TARGETS = {"loader_over_pil": 1.3, "loader_over_decode": 0.7, "resume_skip_s": 1.0}
THROUGHPUT = ("loader", "pil", "decode")  # contenders measured in samples/s; the others are first-batch seconds


def main(argv: list[str]) -> None:
    cli = parser("data", __doc__, samples=(512, "scenes in the throughput set"),
                 workers="loader worker processes for every contender")
    cli.add_argument("--image-size", type=int, default=400, help="side of the stored scenes in pixels (default 400, like DUTS)")
    cli.add_argument("--size", type=int, default=352, help="training size in pixels (default 352)")
    cli.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    cli.add_argument("--skip", type=int, default=10_000, help="samples consumed before the resume (default 10000)")
    args = cli.parse_args(argv)
    # One thread, as in a DataLoader worker: the in-process parts (resume skip, profile) would
    # otherwise time torch's intra-op threads fighting over the cores.
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="salnet-bench-data-") as tmp:
        started = time.perf_counter()
        train_dir, _ = synthesize(Path(tmp) / "synth", train=args.samples, val=1, size=args.image_size, workers=available_cpus())
        raws = [raw for shard in open_shard_set(str(train_dir)).shards for raw in read_shard(shard, range(shard.samples))]
        loose = _write_loose(Path(tmp) / "loose", raws)
        skip_dir = _write_repeated(Path(tmp) / "repeated", raws, samples=(math.ceil(args.skip / args.batch) + 1) * args.batch)
        print(f"made {args.samples} scenes of {args.image_size} px ({_mean_kib(raws):.0f} KiB per JPEG) and a {args.skip}+ sample "
              f"resume set in {time.perf_counter() - started:.1f} s", file=sys.stderr)

        cfg = DataConfig(train=[str(train_dir)], size=args.size, batch_size=args.batch, workers=args.workers)
        stream = TrainStream(cfg, seed=0, rank=0, world_size=1)
        pil = DataLoader(_LoosePIL(loose, cfg), batch_size=args.batch, shuffle=True, drop_last=True,
                         num_workers=args.workers, persistent_workers=True)
        decode = DataLoader(_DecodeOnly(raws), batch_size=args.batch, shuffle=True, drop_last=True,
                            num_workers=args.workers, persistent_workers=True)
        skip_cfg = DataConfig(train=[str(skip_dir)], size=args.size, batch_size=args.batch, workers=0)
        consumed_batches = math.ceil(args.skip / args.batch)

        def describe(latest: dict[str, float]) -> str:
            return (", ".join(f"{name} {latest[name]:.0f} samples/s" for name in THROUGHPUT)
                    + f", first batch fresh {latest['fresh']:.2f} s, resumed {latest['resumed']:.2f} s")

        _first_batch_s(skip_cfg, None)  # warm-up: the first batch of a process also pays one-time kernel set-up
        runs = interleaved(args.repeats, {
            "loader": lambda repeat: _steady_rate(stream.epoch_batches(repeat), args.batch),
            "pil": lambda _: _steady_rate(iter(pil), args.batch),
            "decode": lambda _: _steady_rate(iter(decode), args.batch),
            "fresh": lambda _: _first_batch_s(skip_cfg, None),
            "resumed": lambda _: _first_batch_s(skip_cfg, consumed_batches),
        }, describe)
        profile = _profile_one_sample(raws[0], cfg)

    median = medians(runs)
    rate = {name: median[name] for name in THROUGHPUT}
    skip_s = median["resumed"] - median["fresh"]
    result = {
        "benchmark": "data", "samples": args.samples, "image_size": args.image_size, "size": args.size, "batch": args.batch,
        "workers": args.workers, "repeats": args.repeats, **machine(),
        "loader_samples_per_s": round(rate["loader"], 1), "pil_map_style_samples_per_s": round(rate["pil"], 1),
        "decode_limit_samples_per_s": round(rate["decode"], 1),
        "loader_over_pil": ratio(rate["loader"], rate["pil"]), "loader_over_decode": ratio(rate["loader"], rate["decode"]),
        "resume_skip_samples": consumed_batches * args.batch, "resume_skip_s": round(skip_s, 3),
        "first_batch_fresh_s": round(median["fresh"], 3),
        "first_batch_resumed_s": round(median["resumed"], 3),
        "one_core_ms_per_sample": profile, "targets": TARGETS,
        "meets_targets": {"loader_over_pil": rate["loader"] / rate["pil"] >= TARGETS["loader_over_pil"],
                          "loader_over_decode": rate["loader"] / rate["decode"] >= TARGETS["loader_over_decode"],
                          "resume_skip_s": skip_s < TARGETS["resume_skip_s"]},
    }
    print(f"loader {rate['loader']:.0f} samples/s, PIL map-style {rate['pil']:.0f} samples/s, decode limit {rate['decode']:.0f} "
          f"samples/s ({args.workers} workers each): loader/PIL {result['loader_over_pil']:.2f}x (target {TARGETS['loader_over_pil']}x), "
          f"loader/decode {result['loader_over_decode']:.2f}x (target {TARGETS['loader_over_decode']}x); skipping "
          f"{result['resume_skip_samples']} samples on resume costs {skip_s:.2f} s (target < {TARGETS['resume_skip_s']} s)")
    print(f"one core, ms per sample: {profile}")
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
            writer.add(Sample(key=f"r{index:07d}", image_ext=JPEG_EXT, image=raw.members[JPEG_EXT], mask=raw.members[MASK_EXT],
                              meta=meta, foreground=0.0, soft_mask=False))
        writer.finish(layout="bench", command="python -m salnet.bench data", skipped=[])
    return out


# --------------------------------------------------------------------------------------------
# The contenders
# --------------------------------------------------------------------------------------------


class _LoosePIL(Dataset):
    """The classic SOD loader: one image file and one mask file per sample, PIL, v2 on PIL images."""

    def __init__(self, pairs: list[tuple[Path, Path]], cfg: DataConfig):
        self.pairs, self.pipeline = pairs, TrainAugment(cfg.augment).pipeline(cfg.size)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            # The mask as a tv_tensors.Mask: v2 would colour-jitter a second PIL image as an image.
            image, mask = self.pipeline(image.convert("RGB"), tv_tensors.Mask(v2.functional.pil_to_tensor(mask.convert("L"))))
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


def _profile_one_sample(raw: RawSample, cfg: DataConfig) -> dict[str, float]:
    """Per-sample cost of each stage on one core (min of repeats: the least disturbed measurement)."""
    image, mask = decode_sample(raw)
    stages = {"decode_torchvision": lambda: decode_sample(raw),
              "decode_pil": lambda: [Image.open(io.BytesIO(raw.members[ext])).load() for ext in (JPEG_EXT, MASK_EXT)]}
    sample = (tv_tensors.Image(image), tv_tensors.Mask(mask))
    for step in TrainAugment(cfg.augment).pipeline(cfg.size).transforms:
        name = type(step).__name__ + (f"({step.dtype[tv_tensors.Image]})".replace("torch.", "") if isinstance(step, v2.ToDtype) else "")
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
