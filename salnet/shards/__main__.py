"""`python -m salnet.shards pack|verify|info|synth ...` (each with --help)."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from salnet.imagecheck import DEFAULT_MAX_PIXELS, parse_pixels
from salnet.shards.info import describe
from salnet.shards.layouts import LAYOUTS
from salnet.shards.manifest import ShardsError
from salnet.shards.pack import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, ON_MISMATCH, pack
from salnet.shards.parallel import available_cpus, too_many_workers
from salnet.shards.synth import synthesize
from salnet.shards.tario import DEFAULT_MAX_MEMBER_BYTES
from salnet.shards.verify import verify

PROG = "python -m salnet.shards"
SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'512M', '1G', '64KiB', '1000000' -> bytes (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not a number of bytes with an optional K, M, G or T (e.g. 512M, 1G)"
        )
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def pixels(text: str) -> int:
    try:
        return parse_pixels(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels",
        type=pixels,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse an image or mask whose header declares more pixels, before decoding it; e.g. 100M "
        f"(default {DEFAULT_MAX_PIXELS // 10**6}M; training and predict: data.max_pixels)",
    )
    parser.add_argument(
        "--max-member-bytes",
        type=parse_size,
        default=DEFAULT_MAX_MEMBER_BYTES,
        metavar="SIZE",
        help=f"refuse a file or shard member above this size, before reading it; e.g. 1G "
        f"(default {DEFAULT_MAX_MEMBER_BYTES // 2**20}M; training: data.max_member_bytes)",
    )


def parse_seed(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seed {text!r} must be an integer, or 'none' to keep the sorted order"
        ) from None


def parse_workers(text: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes") from None
    problem = too_many_workers(workers)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}; lower it")
    return workers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Pack SOD datasets into WebDataset tar shards, check them, or synthesize the built-in demo set.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{pack,verify,info,synth}")
    cpus = available_cpus()

    pack = commands.add_parser(
        "pack",
        help="pack a dataset folder (or list file) into shards",
        description="Pack image/mask pairs from SRC into OUT/NAME-000000.tar ... + OUT/manifest.json.",
    )
    pack.add_argument(
        "src", type=Path, metavar="SRC", help="dataset folder as unpacked from its archive, or a list file"
    )
    pack.add_argument("out", type=Path, metavar="OUT", help="output directory (new or empty; see --overwrite)")
    pack.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="how SRC is organised (default: auto, which detects the standard datasets and says which it chose)",
    )
    pack.add_argument(
        "--images", metavar="DIR", help="images folder, relative to SRC (the 'folders' layout; with --masks)"
    )
    pack.add_argument(
        "--masks", metavar="DIR", help="masks folder, relative to SRC (the 'folders' layout; with --images)"
    )
    pack.add_argument("--name", help="dataset name, the shard file prefix (default: OUT's folder name)")
    pack.add_argument(
        "--shard-samples",
        type=int,
        default=DEFAULT_SHARD_SAMPLES,
        metavar="N",
        help=f"samples per shard at most (default {DEFAULT_SHARD_SAMPLES})",
    )
    pack.add_argument(
        "--shard-bytes",
        type=parse_size,
        default=DEFAULT_SHARD_BYTES,
        metavar="SIZE",
        help="bytes per shard at most, e.g. 256M or 1G; a larger sample gets a shard of its own (default 512M)",
    )
    pack.add_argument(
        "--shuffle-seed",
        type=parse_seed,
        default=0,
        metavar="S",
        help="seed of the pack-time shuffle of samples, or 'none' for the sorted key order (default 0)",
    )
    pack.add_argument(
        "--max-side", type=int, metavar="PX", help="downscale images and masks whose longer side exceeds PX"
    )
    pack.add_argument(
        "--workers",
        type=parse_workers,
        default=cpus,
        metavar="N",
        help=f"worker processes (default: the CPUs available, {cpus})",
    )
    pack.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip corrupt, truncated or mismatched pairs (listed in the manifest) instead of stopping",
    )
    pack.add_argument(
        "--on-mismatch",
        choices=ON_MISMATCH,
        default="fail",
        help="an image whose size differs from its mask's: fail (a bad pair: stop, or skip with --skip-bad), "
        'resize the image to its mask (the ground truth; listed under "resized" in the manifest), or skip it '
        '(listed under "skipped") (default: fail)',
    )
    add_limits(pack)
    pack.add_argument(
        "--skip-unpaired",
        action="store_true",
        help="skip files without a partner (listed in the manifest) instead of stopping",
    )
    pack.add_argument("--overwrite", action="store_true", help="replace a previous pack in OUT")

    verify = commands.add_parser(
        "verify",
        help="re-hash and decode every sample; non-zero exit on any problem",
        description="Check every shard against the manifest (size, sha256) and every sample (members, decoding, sizes).",
    )
    verify.add_argument("out", type=Path, metavar="OUT", help="shard directory")
    verify.add_argument(
        "--workers", type=parse_workers, default=cpus, metavar="N", help=f"worker processes (default {cpus})"
    )
    add_limits(verify)

    info = commands.add_parser("info", help="counts, sizes, statistics and how the shards were packed")
    info.add_argument("out", type=Path, metavar="OUT", help="shard directory")

    synth = commands.add_parser(
        "synth",
        help="write the built-in demo dataset (OUT/train and OUT/val)",
        description="Procedural SOD scenes with exact masks, deterministic per seed, written as shards.",
    )
    synth.add_argument("out", type=Path, metavar="OUT", help="output directory; shards go to OUT/train and OUT/val")
    synth.add_argument("--train", type=int, required=True, metavar="N", help="train scenes")
    synth.add_argument("--val", type=int, required=True, metavar="M", help="validation scenes")
    synth.add_argument("--size", type=int, default=128, metavar="PX", help="image side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0); same seed, same bytes")
    synth.add_argument(
        "--workers", type=parse_workers, default=cpus, metavar="N", help=f"worker processes (default {cpus})"
    )
    synth.add_argument(
        "--overwrite", action="store_true", help="replace previous synth output in OUT/train and OUT/val"
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join([*PROG.split(), *argv])
    try:
        if args.command == "pack":
            pack(
                args.src,
                args.out,
                layout=args.layout,
                images=args.images,
                masks=args.masks,
                name=args.name,
                shard_samples=args.shard_samples,
                shard_bytes=args.shard_bytes,
                shuffle_seed=args.shuffle_seed,
                max_side=args.max_side,
                workers=args.workers,
                skip_bad=args.skip_bad,
                skip_unpaired=args.skip_unpaired,
                overwrite=args.overwrite,
                on_mismatch=args.on_mismatch,
                max_pixels=args.max_pixels,
                max_member_bytes=args.max_member_bytes,
                command=command,
            )
        elif args.command == "verify":
            return _verify(args.out, args.workers, args.max_pixels, args.max_member_bytes)
        elif args.command == "info":
            print(describe(args.out))
        else:
            train, val = synthesize(
                args.out,
                args.train,
                args.val,
                size=args.size,
                seed=args.seed,
                workers=args.workers,
                overwrite=args.overwrite,
                command=command,
            )
            print(
                f"synth: wrote {args.train} train scenes to {train} and {args.val} val scenes to {val}", file=sys.stderr
            )
    except ShardsError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _verify(out: Path, workers: int, max_pixels: int, max_member_bytes: int) -> int:
    report = verify(out, workers=workers, max_pixels=max_pixels, max_member_bytes=max_member_bytes)
    for note in report.notes:
        print(f"verify: note: {note}")
    if report.ok:
        print(
            f"verify: OK: {out}: {report.shards} shards, {report.samples} samples; sha256, tar structure and every image and mask checked"
        )
        return 0
    print(f"verify: FAILED: {out}: {len(report.problems)} problems in {report.shards} shards:")
    for problem in report.problems:
        print(f"  {problem}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
