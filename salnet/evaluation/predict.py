"""`python -m salnet.predict`: a checkpoint's saliency maps, as the 8-bit PNGs SOD papers publish.

    python -m salnet.predict --checkpoint runs/NAME/best.pt ~/data/DUTS-TE ~/data/ECSSD --out maps/NAME
    torchrun --nproc_per_node 8 -m salnet.predict --checkpoint runs/NAME/best.pt shards/duts-te --out maps/NAME

Each INPUT ([NAME=]PATH) is one dataset, whose maps go to OUT/NAME/STEM.png:

- a shard directory (it holds manifest.json; or a URL / pipe: source as in data.val): every sample,
  named by its source file's stem (KEY.json), at its original size (`orig_size`, i.e. before any
  `pack --max-side`); NAME defaults to the manifest's dataset name;
- a folder with image files directly in it: every image;
- a dataset folder in a layout `salnet.shards pack` knows (DUTS, ECSSD, HKU-IS, PASCAL-S,
  DUT-OMRON): the images of its pairs;
- a list file: the first path on each line (a pack list of 'image mask' lines works), relative
  to the file's folder.

NAME defaults to the folder's (or list file's) name. A map is one 8-bit grayscale PNG at the
image's upright size, holding floor(255 p) (what salnet.metrics scores). An image file is
prepared exactly as `pack` would store it (EXIF orientation applied, converted to 8-bit RGB) and
decoded by torchvision as the loader decodes shards, so a folder and its packed shards give
identical maps. The network sees the image resized to SIZE x SIZE (default: the checkpoint's
data.eval_size), as in validation. Test-time augmentation averages the probabilities of every
scale (SIZE x s) and, with --tta-flip, of each one's horizontal mirror.

Limits, as for shards: an image file above --max-member-bytes is not read, one whose header
declares more than --max-pixels is not decoded, and a shard sample whose orig_size is above
--max-pixels gets no map allocated (defaults: the checkpoint's data.max_member_bytes and
data.max_pixels); each is an error naming it, or skipped and listed with --skip-bad. OUT must be a
writable folder (checked first).

Under torchrun every rank predicts one contiguous share of the images: each exactly once.
OUT/predict.json records the inputs, settings, per-rank counts and skipped images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from torchvision.io import ImageReadMode, decode_image
from tqdm import tqdm

from salnet import dist
from salnet.data import DataError
from salnet.data.plan import share
from salnet.data.reader import read_sequence
from salnet.data.sources import Limits, ShardSet, local_dir, open_shard_set
from salnet.data.stream import loader_workers, worker_share
from salnet.data.transforms import SampleError, decode_sample, resize_for_eval
from salnet.evaluation.common import (
    PRECISIONS,
    EvaluationError,
    check_name,
    command_parser,
    load_best_weights,
    make_predict,
    names_listed,
    output_dirs,
    raise_if_any,
    run_distributed,
    split_name,
)
from salnet.fsio import atomic_write
from salnet.imagecheck import check_size, parse_pixels
from salnet.metrics.inputs import to_levels
from salnet.shards.images import BadFileError, prepare_image, read_file
from salnet.shards.layouts import IMAGE_EXTENSIONS, find_pairs, list_file_lines
from salnet.validate import probabilities_at

PROG = "python -m salnet.predict"
T = TypeVar("T")


class SourceKind(Enum):
    """What an INPUT is; the value is predict.json's "kind"."""

    SHARDS = "shards"  # a shard directory, URL or pipe: source
    IMAGES = "images"  # a folder with image files directly in it
    DATASET = "dataset"  # a dataset folder in a layout `pack` knows
    LIST = "list"  # a list file


@dataclass
class Source:
    """One INPUT: a dataset whose maps go to OUT/name/."""

    name: str
    given: str  # the INPUT as given
    kind: SourceKind
    files: list[tuple[str, str]] = field(default_factory=list)  # (stem, path) of an image file source
    shards: ShardSet | None = None

    @property
    def count(self) -> int:
        return self.shards.samples if self.shards is not None else len(self.files)


def resolve(text: str, limits: Limits) -> Source:
    name, location = split_name(text)
    path = Path(location)
    if local_dir(location) is None or (path / "manifest.json").is_file():  # a URL, pipe: or a local shard directory
        shards = open_shard_set(location, limits)
        return Source(check_name(name or shards.name, "dataset"), text, SourceKind.SHARDS, shards=shards)
    if not path.exists():
        raise EvaluationError(f"input '{location}' does not exist")
    default = path.resolve().stem if path.is_file() else path.resolve().name
    if path.is_file():
        kind, files = SourceKind.LIST, _list_file(path)
    elif _images_in(path):
        kind, files = SourceKind.IMAGES, [(Path(p).stem, p) for p in _images_in(path)]
    else:
        found = find_pairs(path)  # a known dataset layout, or a ShardsError saying what was looked for
        kind, files = SourceKind.DATASET, [(Path(p.image).stem, p.image) for p in found.pairs]
    twice = sorted(_repeated(stem for stem, _ in files))
    if twice:
        paths = [p for stem, p in files if stem in set(twice)]
        raise EvaluationError(
            f"input '{location}': {len(twice)} file stems are used more than once, so their maps would "
            f"overwrite each other: {names_listed(paths)}"
        )
    if not files:
        raise EvaluationError(f"input '{location}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Source(check_name(name or default, "dataset"), text, kind, files=files)


def _repeated(values: Iterable[T]) -> list[T]:
    """The values that occur more than once, in the order they first occur."""
    return [value for value, n in Counter(values).items() if n > 1]


def _images_in(folder: Path) -> list[str]:
    return sorted(
        str(p)
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _list_file(path: Path) -> list[tuple[str, str]]:
    return [(Path(fields[0]).stem, str(path.parent / fields[0])) for _, _, fields in list_file_lines(path)]


# What the loader hands over. A DataLoader's workers pass dataclasses on as they are; only pinned
# memory needs dicts (salnet.data's batches are TypedDicts for that), and this loader pins none.
@dataclass
class Prepared:
    """An image ready for the network; its map goes to OUT/dataset/stem.png."""

    dataset: str
    stem: str
    where: str  # the file, or the shard and sample
    size: tuple[int, int]  # the map's height and width: the image's upright original size
    inputs: list[torch.Tensor]  # uint8 [3, S, S], one per input size


@dataclass
class BadImage:
    """An image that cannot be read or decoded: --skip-bad lists it and goes on, otherwise it stops the run."""

    dataset: str
    where: str
    reason: str


@dataclass
class BadShard:
    """A shard that cannot be read (not one image): it stops the run, --skip-bad or not."""

    message: str


class _Images(IterableDataset):
    """This rank's items (source index, index in source), each loader worker its worker_share, made
    ready for the network at every input size."""

    def __init__(self, sources: list[Source], items: list[tuple[int, int]], sizes: list[int], limits: Limits):
        self.sources, self.items, self.sizes, self.limits = sources, items, sizes, limits

    def __iter__(self) -> Iterator[Prepared | BadImage | BadShard]:
        try:
            for s, group in itertools.groupby(worker_share(self.items), key=lambda item: item[0]):
                source, indices = self.sources[s], [i for _, i in group]
                if source.kind is SourceKind.SHARDS:
                    yield from self._from_shards(source, indices)
                else:
                    yield from (self._from_file(source, i) for i in indices)
        except DataError as e:
            yield BadShard(str(e))

    def _ready(self, source: Source, stem: str, where: str, image: torch.Tensor, size) -> Prepared:
        inputs = [resize_for_eval(image, s) for s in self.sizes]
        return Prepared(source.name, stem, where, tuple(int(v) for v in size), inputs)

    def _from_file(self, source: Source, index: int) -> Prepared | BadImage:
        stem, path = source.files[index]
        try:
            # the file's size is checked before reading it, its header before decoding it
            data = read_file(path, self.limits.max_member_bytes, "for one image; not read (--max-member-bytes)")
            # upright 8-bit RGB JPEG/PNG bytes, as pack stores
            prepared = prepare_image(data, path, max_side=None, max_pixels=self.limits.max_pixels)
            image = decode_image(torch.frombuffer(bytearray(prepared.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except BadFileError as e:
            return BadImage(source.name, path, e.reason)
        except (OSError, RuntimeError) as e:
            return BadImage(source.name, path, f"cannot read or decode it: {e}")
        return self._ready(source, stem, path, image, prepared.orig_size)

    def _from_shards(self, source: Source, indices: list[int]) -> Iterator[Prepared | BadImage]:
        for raw in read_sequence(source.shards.shards, indices):
            try:
                image, _ = decode_sample(raw)  # the loader's decoder
                meta = json.loads(raw.members["json"]) if "json" in raw.members else {}
                size = _map_size(meta, image, self.limits.max_pixels)
            except (SampleError, ValueError) as e:
                yield BadImage(source.name, raw.where(), str(e))
                continue
            stem = Path(meta["source"]).stem if meta.get("source") else raw.key
            yield self._ready(source, stem, raw.where(), image, size)


def _map_size(meta: dict, image: torch.Tensor, max_pixels: int) -> tuple[int, int]:
    """(H, W) of a shard sample's map: KEY.json's orig_size (its size before pack's --max-side), else the
    stored image's. The map is allocated at that size, so it is held to the pixel limit of decoding:
    a KEY.json is as untrusted as the image it describes."""
    size = meta.get("orig_size")
    if size is None:
        return tuple(image.shape[-2:])
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
        raise ValueError(f"KEY.json's orig_size {size!r} is not [height, width] in positive whole pixels")
    check_size((size[1], size[0]), f"KEY.json's orig_size {size}", max_pixels)
    return size[0], size[1]


def average_probabilities(predict, batch: list[Prepared], flip: bool) -> list[torch.Tensor]:
    """Mean probability map per image over the scales (and their mirrors), at each image's output size."""
    sizes = [item.size for item in batch]
    total, count = None, 0
    for k in range(len(batch[0].inputs)):
        images = torch.stack([item.inputs[k] for item in batch])
        views = [(images, False)] + ([(images.flip(-1), True)] if flip else [])
        for view, mirrored in views:
            logits = predict(view)
            probs = probabilities_at(logits.flip(-1) if mirrored else logits, sizes)
            total = probs if total is None else [t + p for t, p in zip(total, probs, strict=True)]
            count += 1
    return total if count == 1 else [t / count for t in total]


def map_path(out: Path, item: Prepared) -> Path:
    """OUT/DATASET/STEM.png. Stems come from file names, KEY.json's source or a shard key (held to the
    shard format's key rule where shards are read); whatever they hold, no map is written elsewhere."""
    name = f"{item.stem}.png"
    if Path(name).name != name:  # a '/' in it, or an absolute path
        raise EvaluationError(f"{item.where}: the map name {name!r} is a path, not a file name in {out / item.dataset}")
    return out / item.dataset / name


def write_map(prob: torch.Tensor, path: Path) -> None:
    Image.fromarray(to_levels(prob).to(torch.uint8).cpu().numpy()).save(path, "PNG")  # 2-D uint8: mode L


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser(PROG, __doc__)
    parser.add_argument(
        "inputs", nargs="+", metavar="[NAME=]INPUT", help="shard directory, image folder, dataset folder or list file"
    )
    parser.add_argument("--checkpoint", required=True, help="a run's best.pt (or one exported by convert)")
    parser.add_argument(
        "--max-pixels",
        type=parse_pixels,
        help="refuse an image whose header declares more pixels, before "
        "decoding it, e.g. 100M (default: the checkpoint's data.max_pixels)",
    )
    parser.add_argument(
        "--max-member-bytes",
        type=int,
        metavar="BYTES",
        help="refuse an image file or shard member above this size, before reading it "
        "(default: the checkpoint's data.max_member_bytes)",
    )
    parser.add_argument("--out", required=True, type=Path, help="maps go to OUT/<dataset>/<stem>.png")
    parser.add_argument("--size", type=int, help="network input size (default: the checkpoint's data.eval_size)")
    parser.add_argument("--tta-flip", action="store_true", help="also predict the mirrored image and average")
    parser.add_argument(
        "--tta-scales",
        default="1",
        help="comma-separated multiples of --size whose predictions are averaged (default: 1)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass on each rank (default: 16)")
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), help="autocast precision (default: the checkpoint's train.amp)"
    )
    parser.add_argument(
        "--workers", type=int, help="decoding processes per rank (default: CPUs per rank - 1, at most 8)"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable images (listed in OUT/predict.json) instead of stopping",
    )
    args = parser.parse_args(argv)
    try:
        args.scales = [float(s) for s in args.tta_scales.split(",")]
    except ValueError:
        parser.error(f"--tta-scales {args.tta_scales!r}: expected comma-separated numbers, e.g. 0.75,1,1.25")
    for flag, value in (("--size", args.size), ("--batch-size", args.batch_size), ("--tta-scales", min(args.scales))):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    return args


@dataclass(frozen=True)
class Settings:
    """How the maps are made, as predict.json records them."""

    checkpoint: str
    step: int | None
    size: int  # the network's input side at scale 1
    input_sizes: list[int]  # one per --tta-scales
    tta_flip: bool
    precision: str


@dataclass
class RankOutcome:
    """What one rank did."""

    written: list[tuple[str, str]] = field(default_factory=list)  # (dataset, stem) of each map written
    skipped: list[BadImage] = field(default_factory=list)  # with --skip-bad


def predict_main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    output_dirs(args.out)
    checkpoint = load_best_weights(args.checkpoint)
    size = args.size or int(checkpoint.setting("data", "eval_size", 352))
    settings = Settings(
        checkpoint=str(args.checkpoint),
        step=checkpoint.step,
        size=size,
        input_sizes=[max(1, round(size * s)) for s in args.scales],
        tta_flip=args.tta_flip,
        precision=checkpoint.precision(args.precision),
    )
    predict = make_predict(checkpoint, settings.precision)
    limits = Limits(
        args.max_member_bytes or int(checkpoint.setting("data", "max_member_bytes", Limits().max_member_bytes)),
        args.max_pixels or int(checkpoint.setting("data", "max_pixels", Limits().max_pixels)),
    )
    sources = [resolve(text, limits) for text in args.inputs]
    twice = _repeated(s.name for s in sources)
    if twice:
        raise EvaluationError(f"two inputs have the dataset name {', '.join(twice)}: name them apart with NAME=INPUT")
    items = [(s, i) for s, source in enumerate(sources) for i in range(source.count)]
    mine = items[share(len(items), dist.world_size(), dist.rank())]  # cut as validation cuts its sets
    output_dirs(*(args.out / source.name for source in sources))

    images = _Images(sources, mine, settings.input_sizes, limits)
    loader = DataLoader(images, batch_size=None, num_workers=loader_workers(args.workers, len(mine)))
    progress = tqdm(total=len(mine), desc="predict", unit="img", disable=not (dist.is_main() and sys.stderr.isatty()))
    done, error, batch = RankOutcome(), None, []

    def flush() -> None:
        for item, prob in zip(batch, average_probabilities(predict, batch, args.tta_flip), strict=True):
            write_map(prob, map_path(args.out, item))
            done.written.append((item.dataset, item.stem))
        progress.update(len(batch))
        batch.clear()

    try:
        for item in loader:
            if isinstance(item, BadShard):
                error = item.message
                break
            if isinstance(item, BadImage):
                if not args.skip_bad:
                    error = (
                        f"{item.where}: {item.reason}\npass --skip-bad to skip unreadable images "
                        f"(they are listed in {args.out / 'predict.json'})"
                    )
                    break
                done.skipped.append(item)
                progress.update(1)
                continue
            batch.append(item)
            if len(batch) == args.batch_size:
                flush()
        if batch and error is None:
            flush()
    except (EvaluationError, SampleError, OSError, RuntimeError) as e:  # a shard that ends early, a failed write, ...
        error = str(e)
    progress.close()
    raise_if_any(error)
    return summarise(settings, sources, done, args.out, time.perf_counter() - started)


def summarise(settings: Settings, sources: list[Source], done: RankOutcome, out: Path, seconds: float) -> dict:
    """Gather what every rank did; rank 0 checks that no two images shared a map and writes OUT/predict.json."""
    per_rank = dist.all_gather_object(done)
    written = [w for r in per_rank for w in r.written]
    skipped = [k for r in per_rank for k in r.skipped]
    clashes = sorted(f"{dataset}/{stem}.png" for dataset, stem in _repeated(written))
    if clashes:
        raise_if_any(
            f"several images have the same source stem, so their maps overwrote each other: {names_listed(clashes)}"
        )
    report = {
        **asdict(settings),
        "world_size": dist.world_size(),
        "datasets": {
            s.name: {
                "input": s.given,
                "kind": s.kind.value,
                "images": s.count,
                "written": sum(1 for dataset, _ in written if dataset == s.name),
                "skipped": [
                    {"dataset": k.dataset, "path": k.where, "reason": k.reason} for k in skipped if k.dataset == s.name
                ],
            }
            for s in sources
        },
        "per_rank": [len(r.written) + len(r.skipped) for r in per_rank],
    }
    if dist.is_main():
        with atomic_write(out / "predict.json") as f:
            json.dump(report, f, indent=2)
        print(
            f"predict: wrote {len(written)} maps of {len(sources)} dataset(s) to {out} in {seconds:.1f} s "
            f"({len(written) / max(seconds, 1e-9):.1f} img/s on {dist.world_size()} rank(s))",
            flush=True,
        )
        for name, entry in report["datasets"].items():
            line = f"  {name}: {entry['written']} maps"
            if entry["skipped"]:
                line += f", {len(entry['skipped'])} skipped: " + names_listed([k["path"] for k in entry["skipped"]])
            print(line, flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_distributed(PROG, lambda: predict_main(args))
