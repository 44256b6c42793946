"""`python -m salnet.bench pack`: packing throughput against `tar cf` and a bare PIL decode.

Makes N synthetic scenes as loose files (JPEG quality 90 + PNG mask, ECSSD layout), warms the
page cache, then, in each repeat, times three things over the same files:

  pack    `salnet.shards.pack` with --workers W (pool start-up and manifest included)
  tar     `tar cf` of the same folder: the cost of moving the bytes, no checking at all
  decode  one process opening and fully decoding every image with PIL: what validation costs
          when it is done naively, on one core

and reports medians in samples/s and the ratios. The target is pack >= 1.5x decode: packing
must be parallel and spend real time on nothing but validation. It also reports CPU time per
sample (all processes) and the cores pack got, because on a shared machine the wall-clock ratio
depends on the neighbours: `pack_over_decode_if_cores_free` is workers x decode CPU / pack CPU.
"""

from __future__ import annotations

import io
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from salnet.bench._harness import emit, interleaved, machine, medians, parser, ratio
from salnet.shards.pack import pack
from salnet.shards.parallel import available_cpus, ordered_map
from salnet.shards.synth import render_scene

TARGET_PACK_OVER_DECODE = 1.5
JPEG_QUALITY = 90
NOISE_SIGMA = 6


def main(argv: list[str]) -> None:
    cli = parser("pack", __doc__, samples=(2000, "image/mask pairs"), workers="pack worker processes")
    cli.add_argument("--size", type=int, default=350, help="image side in pixels (default 350)")
    args = cli.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="salnet-bench-pack-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        started = time.perf_counter()
        _write_loose_files(src, args.samples, args.size, workers=available_cpus())
        images = sorted((src / "images").iterdir())
        print(
            f"made {args.samples} pairs of {args.size} px in {time.perf_counter() - started:.1f} s "
            f"({sum(p.stat().st_size for p in images) / len(images) / 1024:.0f} KiB per JPEG)",
            file=sys.stderr,
        )
        for path in src.rglob("*"):  # warm the page cache: every contender reads from memory
            if path.is_file():
                path.read_bytes()

        def run_pack(_: int) -> tuple[float, float]:
            shutil.rmtree(out, ignore_errors=True)  # the previous repeat's output, removed before the clock starts
            return _timed(partial(pack, src, out / "shards", workers=args.workers, log=lambda _: None))

        runs = interleaved(
            args.repeats,
            {
                "pack": run_pack,
                "tar": lambda _: _timed(
                    partial(subprocess.run, ["tar", "cf", str(out / "plain.tar"), "-C", str(src), "."], check=True)
                ),
                "decode": lambda _: _timed(partial(_decode_all, images)),
            },
            describe=lambda latest: ", ".join(f"{name} {wall:.2f} s" for name, (wall, _) in latest.items()),
        )

    wall = medians({name: [w for w, _ in values] for name, values in runs.items()})
    cpu = medians({name: [c for _, c in values] for name, values in runs.items()})
    rate = {name: args.samples / seconds for name, seconds in wall.items()}
    cpu_ms = {name: 1000 * seconds / args.samples for name, seconds in cpu.items()}
    result = {
        "benchmark": "pack",
        "samples": args.samples,
        "size": args.size,
        "jpeg_quality": JPEG_QUALITY,
        "workers": args.workers,
        "repeats": args.repeats,
        **machine(),
        "pack_samples_per_s": round(rate["pack"], 1),
        "tar_samples_per_s": round(rate["tar"], 1),
        "pil_decode_samples_per_s": round(rate["decode"], 1),
        "pack_over_decode": ratio(rate["pack"], rate["decode"]),
        "pack_over_tar": ratio(rate["pack"], rate["tar"]),
        "target_pack_over_decode": TARGET_PACK_OVER_DECODE,
        "meets_target": rate["pack"] / rate["decode"] >= TARGET_PACK_OVER_DECODE,
        # CPU time (all processes) per sample, and how many cores pack actually got: on a shared
        # machine the wall-clock ratio says as much about the neighbours as about pack.
        "pack_cpu_ms_per_sample": round(cpu_ms["pack"], 3),
        "decode_cpu_ms_per_sample": round(cpu_ms["decode"], 3),
        "pack_cores_used": round(cpu["pack"] / wall["pack"], 2),
        # The wall-clock ratio pack would reach with one free core per worker.
        "pack_over_decode_if_cores_free": ratio(args.workers * cpu_ms["decode"], cpu_ms["pack"]),
    }
    print(
        f"pack {rate['pack']:.0f} samples/s ({args.workers} workers, {result['pack_cores_used']} cores used), "
        f"tar cf {rate['tar']:.0f} samples/s, PIL decode {rate['decode']:.0f} samples/s (1 process); "
        f"pack/decode {result['pack_over_decode']:.2f}x (target {TARGET_PACK_OVER_DECODE}x; "
        f"{result['pack_over_decode_if_cores_free']:.2f}x with {args.workers} free cores, from CPU time: "
        f"pack {cpu_ms['pack']:.2f} ms/sample, decode {cpu_ms['decode']:.2f} ms/sample), pack/tar {result['pack_over_tar']:.2f}x"
    )
    emit(result)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pack's workers, tar)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - started, _cpu_seconds() - cpu_started


def _decode_all(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as im:
            im.load()


def _write_loose_files(src: Path, count: int, size: int, workers: int) -> None:
    (src / "images").mkdir(parents=True)
    (src / "ground_truth_mask").mkdir()
    for index, (jpeg, png) in enumerate(
        ordered_map(partial(_encoded_scene, size=size), list(range(count)), workers, desc="bench data")
    ):
        (src / "images" / f"{index:05d}.jpg").write_bytes(jpeg)
        (src / "ground_truth_mask" / f"{index:05d}.png").write_bytes(png)


def _encoded_scene(index: int, size: int) -> tuple[bytes, bytes]:
    """A demo scene rendered at a third of the size (rendering is the slow part), upscaled, with
    sensor-like noise so that the JPEG carries about as many bytes as a photo of that size."""
    rng = np.random.default_rng([7, index])
    rgb, mask = render_scene(rng, max(32, size // 3))
    image = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.normal(0, NOISE_SIGMA, image.shape).astype(np.int16), 0, 255).astype(np.uint8)
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpeg, "JPEG", quality=JPEG_QUALITY)
    Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST).save(png, "PNG")
    return jpeg.getvalue(), png.getvalue()
