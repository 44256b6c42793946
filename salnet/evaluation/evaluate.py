"""`python -m salnet.evaluate`: SOD metrics per dataset and method, as tables, curves and plots.

    # a checkpoint on packed test sets (every rank scores its share, as in validation)
    torchrun --nproc_per_node 8 -m salnet.evaluate --checkpoint runs/NAME/best.pt \\
        --data DUTS-TE=shards/duts-te --data ECSSD=shards/ecssd --out results/NAME
    # folders of saliency maps of any method against ground-truth folders
    python -m salnet.evaluate --pred salnet=maps/NAME --pred F3Net=~/maps/F3Net \\
        --gt DUTS-TE=~/data/DUTS-TE/DUTS-TE-Mask --gt ECSSD=~/data/ECSSD --out results/all

Both kinds can be given together; the table then compares them all. Metrics (by default the
standard families F E S wF MAE; --metrics to choose): maxF, meanF, adpF, maxE, meanE, adpE, S, wF,
MAE, and on request IoU, Dice, BER (max/mean/adp each), MSIoU (max/mean/adp), SI-MAE, SI-F
(SI-maxF, SI-meanF, SI-adpF) and HCE (needs scikit-image), all equal to PySODMetrics 1.6.2 on the
same 8-bit maps.

- --checkpoint [METHOD=]best.pt (METHOD defaults to the run's name) with --data [NAME=]SHARDS
  (NAME defaults to the manifest's): the network runs as validation runs it, on
  data.eval_size inputs (--size), at train.amp precision (--precision), and each map is scored
  at its mask's size, so a checkpoint scores what validation logged for it.
- --pred [METHOD=]DIR with --gt [NAME=]GT: DIR/NAME/ holds the maps of dataset NAME (with one
  dataset, DIR itself may hold them); GT is a folder of masks or a dataset folder in a layout
  `salnet.shards pack` knows. Maps and masks are matched by file stem and read by the rule pack
  reads masks with (salnet.evaluation.folders: grey stored any way is that grey, a colour file is
  refused, a 0/1 mask is scaled to 0/255; for 8-bit grey files what PySODEvalToolkit's OpenCV
  grayscale read gives), and a map of another size is resized to its mask's with bilinear
  cv2.resize. A mask without a map or a map without a mask is an error listing them;
  --allow-missing scores the matched pairs and reports the counts. A map or mask that cannot be
  read so (truncated, corrupt, colour, above --max-pixels or --max-member-bytes) is an error
  naming it; --skip-bad leaves such pairs out, counted ("skipped") and listed.

Uncertainty (--bootstrap N, default 1000; 0 turns it off; --seed S, default 0): every image's
values are kept with its key (a map's file stem; a shard sample's key), and each dataset metric gets
a 95 % percentile bootstrap interval over the images (N resamples, the same for every method of a
dataset; maxF and maxE are the max of each resample's mean curve), and each pair of methods on the
same images a paired permutation test per metric (salnet.metrics.bootstrap says why that test).
The tables mark with a dagger the values whose difference from the column's best is not
significant at 0.05.

--out DIR writes results.json, results.csv, results.md, results.tex, curves.json
({dataset: {method: {threshold, precision, recall, F, E}}}, 256 points, point i at threshold
255 - i), plots/pr_DATASET.png and plots/fm_DATASET.png, and per_image/DATASET/METHOD.npz
(salnet.metrics.PerImage: "keys", sorted, and one array per per-image quantity, MAE, S, F, ...).
results.json is {"format": "salnet-results/2", "made": {command, salnet, date}, "card": the
metrics card, "bootstrap": the settings or null, "results": {dataset: {method: {metric: value,
"images": n, "ci95": {metric: [lo, hi]}, "p": {metric: {other method: p}}}}}}. The metrics card
(salnet.evaluation.card) states every definition the numbers depend on, in results.json and at the
head of the CSV ('#' lines: pandas.read_csv(..., comment="#")), LaTeX ('%' lines) and Markdown.
--out also writes index.html: one static page (no network, no server) with the sortable tables and
their intervals, the curves, per dataset a gallery (gallery/: the --gallery K images where the
methods differ most by per-image MAE and each method's K worst, image | mask | every map) and the card.

    python -m salnet.evaluate --merge A/results.json B/results.json --out C

merges comparisons (tables, curves, per-image files, page) only when the two cards agree, and
otherwise lists each differing definition; with per-image files, the p-values of pairs from different
inputs are computed too. --wandb also logs the table, the curves and the gallery to W&B (offline
mode works), in the W&B group of the run whose best.pt was scored.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

from pydantic import ValidationError

import salnet
from salnet import dist
from salnet.config import DataConfig
from salnet.data import ValStream
from salnet.data.sources import Limits, open_shard_set
from salnet.evaluation import card, folders, gallery, tables, wandb_log
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
    run_main,
    split_name,
)
from salnet.evaluation.merge import merge_main
from salnet.fsio import atomic_write
from salnet.imagecheck import DEFAULT_MAX_PIXELS, parse_pixels
from salnet.metrics import DEFAULT_FAMILIES, FAMILIES, PerImage, SODMetrics, curve_plots, metric_names
from salnet.metrics import bootstrap as uncertainty
from salnet.metrics.names import MissingPackageError, check_packages
from salnet.pages.results import write_results_page
from salnet.shards.images import BadFileError
from salnet.shards.tario import DEFAULT_MAX_MEMBER_BYTES
from salnet.validate import validate

PROG = "python -m salnet.evaluate"
FORMAT = "salnet-results/2"
CHUNK = 16  # map/mask pairs per SODMetrics.update in folder mode


class Report:
    """{dataset: {method: scores}}, the curves and each image's values (`per_image[dataset][method]`,
    a `PerImage`: sorted keys, the same images for every method unless --allow-missing left some
    out), in the order datasets and methods were given. `bootstrap` (the settings, or None) and each
    scores' "ci95" and "p" are filled by `add_uncertainty`."""

    def __init__(self, datasets: list[str], pictures: gallery.GallerySources | None = None):
        self.results: dict[str, dict[str, dict]] = {d: {} for d in datasets}
        self.curves: dict[str, dict[str, dict]] = {d: {} for d in datasets}
        self.per_image: dict[str, dict[str, PerImage]] = {d: {} for d in datasets}
        self.bootstrap: dict | None = None
        self.card: dict = {}
        self.made: dict = {}
        self.scored_configs: list[dict] = []  # the best.pt configs scored (--wandb groups with their run)
        # where each method's maps came from, so the gallery can read the chosen images again
        self.pictures = pictures if pictures is not None else gallery.GallerySources()

    def add(self, dataset: str, method: str, metrics: SODMetrics, **counts: int) -> None:
        if method in self.results[dataset]:
            raise EvaluationError(
                f"method {method!r} is given twice for dataset {dataset}: name them apart with METHOD=PATH"
            )
        self.results[dataset][method] = {**metrics.compute(), "images": metrics.num_images, **counts}
        self.curves[dataset][method] = metrics.curves()
        self.per_image[dataset][method] = metrics.per_image()

    def add_uncertainty(self, resamples: int, seed: int) -> None:
        """Each metric's 95 % bootstrap interval ("ci95") and its paired tests against every other
        method of the dataset ("p"), from the per-image values (salnet.metrics.bootstrap)."""
        self.bootstrap = {
            "resamples": resamples,
            "seed": seed,
            "level": uncertainty.LEVEL,
            "interval": uncertainty.INTERVAL,
            "test": uncertainty.TEST,
        }
        for dataset, by_method in self.per_image.items():
            if not by_method:
                continue
            found = uncertainty.bootstrap(by_method, resamples, seed)
            for method, scores in self.results[dataset].items():
                scores["ci95"] = {name: list(bounds) for name, bounds in found.intervals[method].items()}
                scores["p"] = found.p_values[method]

    def document(self) -> dict:
        """results.json: format, how it was made, the metrics card, the bootstrap settings, the results."""
        return {
            "format": FORMAT,
            "made": self.made,
            "card": self.card,
            "bootstrap": self.bootstrap,
            "results": {d: by for d, by in self.results.items() if by},
        }


def _named(texts: list[str], what: str, default) -> list[tuple[str, str]]:
    """[NAME=]VALUE arguments -> [(name, value)], names defaulting to default(value); a name given twice is an error."""
    out = []
    for text in texts:
        name, value = split_name(text)
        out.append((check_name(name or default(value), what), value))
    seen = [n for n, _ in out]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise EvaluationError(f"{what} name(s) {', '.join(twice)} given twice: name them apart with NAME=PATH")
    return out


def score_checkpoints(args: argparse.Namespace, report: Report, families: list[str]) -> None:
    for text in args.checkpoint:
        name, path = split_name(text)
        checkpoint = load_best_weights(path)
        report.scored_configs.append(checkpoint.config)
        method = check_name(name or checkpoint.run_name, "method")  # a method given twice: Report.add says so
        predict = make_predict(checkpoint, checkpoint.precision(args.precision))
        for dataset, location in args.data_sets:
            overrides = {"val": [location]}
            for key, value in (
                ("eval_size", args.size),
                ("eval_batch_size", args.batch_size),
                ("workers", args.workers),
            ):
                if value is not None:
                    overrides[key] = value
            try:
                data_cfg = DataConfig.model_validate({**(checkpoint.config.get("data") or {}), **overrides})
            except ValidationError as e:
                raise EvaluationError(
                    f"checkpoint '{path}': its 'data' config with {overrides} is not valid: {e}"
                ) from None
            metrics = SODMetrics(families, device=dist.device(), per_image=True)
            validate(predict, ValStream(data_cfg, dist.rank(), dist.world_size()), metrics)
            report.add(dataset, method, metrics)
            report.pictures.add_checkpoint(dataset, method, location, path)


def score_folders(args: argparse.Namespace, report: Report, families: list[str]) -> None:
    truths = [(name, folders.ground_truth(Path(location))) for name, location in args.gt_sets]
    device, rank, world = dist.device(), dist.rank(), dist.world_size()
    limits = Limits(args.max_member_bytes, args.max_pixels)
    for method, location in _named(args.pred, "method", lambda p: Path(p).resolve().name):
        for dataset, gt in truths:
            pred_dir = folders.prediction_dir(Path(location), dataset, only_dataset=len(truths) == 1)
            label = f"{method} on {dataset}"
            matched = folders.match(gt, pred_dir, label, args.allow_missing)
            metrics, error, skipped = SODMetrics(families, device=device, per_image=True), None, []
            mine = matched.pairs[rank::world]
            try:
                for start in range(0, len(mine), CHUNK):
                    read, stems = [], []
                    for stem, gt_path, pred_path in mine[start : start + CHUNK]:
                        try:
                            read.append(folders.read_pair(gt_path, pred_path, limits))
                            stems.append(stem)
                        except BadFileError as e:
                            if not args.skip_bad:
                                raise EvaluationError(
                                    f"{e}\npass --skip-bad to leave such pairs out (they are counted and listed)"
                                ) from None
                            skipped.append(str(e))
                    if read:
                        metrics.update([p.to(device) for p, _ in read], [g.to(device) for _, g in read], keys=stems)
            except (EvaluationError, ValueError) as e:  # ValueError: SODMetrics' checks, naming the shapes
                error = f"{label}: {e}"
            raise_if_any(error)
            skipped = sorted(s for per_rank in dist.all_gather_object(skipped) for s in per_rank)
            metrics.all_reduce()
            if not metrics.num_images:
                raise_if_any(f"{label}: none of the {len(skipped)} pairs could be read: {names_listed(skipped)}")
            if skipped and dist.is_main():
                print(
                    f"evaluate: {label}: skipped {len(skipped)} pairs (--skip-bad): {names_listed(skipped)}",
                    file=sys.stderr,
                    flush=True,
                )
            counts = {"missing": len(matched.missing), "extra": len(matched.extra)}
            report.add(dataset, method, metrics, **counts, **({"skipped": len(skipped)} if args.skip_bad else {}))
            report.pictures.add_folder(dataset, method, Path(dict(args.gt_sets)[dataset]), pred_dir)


def write_outputs(report: Report, metrics: list[str], out: Path, plot_format: str, gallery_images: int) -> dict:
    """Every output file and index.html; returns the galleries' descriptions ({dataset: ...})."""
    results = {d: by for d, by in report.results.items() if by}
    curves = {d: by for d, by in report.curves.items() if by}
    out.mkdir(parents=True, exist_ok=True)
    for dataset, by_method in report.per_image.items():
        for method, rows in by_method.items():
            with atomic_write(out / "per_image" / dataset / f"{method}.npz", "wb") as f:
                rows.save(f)
    for name, text in (
        ("results.json", json.dumps(report.document(), indent=2) + "\n"),
        ("results.csv", card.csv_comment(report.card) + tables.csv_text(results, metrics)),
        ("results.md", tables.markdown(results, metrics) + "\n" + card.markdown(report.card)),
        ("results.tex", card.latex_comment(report.card) + tables.latex(results, metrics)),
        ("curves.json", json.dumps(curves) + "\n"),
    ):
        with atomic_write(out / name) as f:
            f.write(text)
    curve_plots.save(curves, out / "plots", plot_format)
    galleries = report.pictures.write(out, report.per_image, gallery_images)
    write_results_page(out, report.document(), curves, galleries)
    return galleries


def write_merged(document: dict, curves: dict, out: Path, plot_format: str) -> None:
    """--merge's writer: a merged results.json (salnet.evaluation.merge) written as evaluate writes its
    own; merge_main copies the per-image files itself. Its page has no gallery: the maps are not at hand."""
    report = Report(list(document["results"]))
    report.results, report.curves = document["results"], curves
    report.made, report.card, report.bootstrap = document["made"], document["card"], document["bootstrap"]
    write_outputs(report, metric_names(document["card"]["families"]), out, plot_format, gallery_images=0)


def _pixels(text: str) -> int:
    try:
        return parse_pixels(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser(PROG, __doc__)
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="[METHOD=]BEST_PT",
        help="a best.pt to score on every --data set",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="[NAME=]SHARDS",
        help="a shard directory (or URL) for --checkpoint",
    )
    parser.add_argument(
        "--pred", action="append", default=[], metavar="[METHOD=]DIR", help="a method's maps: DIR/<dataset>/<stem>.png"
    )
    parser.add_argument(
        "--gt",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a ground-truth folder (or dataset folder) for --pred",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=FAMILIES,
        default=list(DEFAULT_FAMILIES),
        help=f"metric families (default: {' '.join(DEFAULT_FAMILIES)}; HCE needs scikit-image)",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="score only the maps that have a mask and vice versa; report the counts",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="--pred: leave out the pairs whose map or mask cannot be read (corrupt, colour, too large), "
        "counted and listed, instead of stopping",
    )
    parser.add_argument(
        "--max-pixels",
        type=_pixels,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="--pred: refuse a map or mask whose header declares more pixels, before decoding it; "
        f"e.g. 100M (default {DEFAULT_MAX_PIXELS // 10**6}M)",
    )
    parser.add_argument(
        "--max-member-bytes",
        type=int,
        default=DEFAULT_MAX_MEMBER_BYTES,
        metavar="BYTES",
        help=f"--pred: refuse a map or mask file above this size, before reading it "
        f"(default {DEFAULT_MAX_MEMBER_BYTES}, 256 MiB)",
    )
    parser.add_argument(
        "--out", type=Path, help="write results.{json,csv,md,tex}, curves.json, plots/ and per_image/ here"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="resamples for the 95%% intervals and the paired tests (default 1000; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=[],
        metavar="RESULTS_JSON",
        help="merge earlier evaluations' results.json (their metrics cards must agree) into --out; scores nothing",
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the results table, curves and gallery to W&B, in the scored checkpoint's run group "
        "(WANDB_MODE=offline works)",
    )
    parser.add_argument(
        "--gallery",
        type=int,
        default=gallery.DEFAULT_K,
        metavar="K",
        help=f"index.html's gallery, per dataset: the K images where the methods differ most (per-image MAE) and "
        f"each method's K worst (default {gallery.DEFAULT_K}; 0: none)",
    )
    parser.add_argument(
        "--plot-format", choices=curve_plots.FORMATS, default="png", help="format of the plots (default: png)"
    )
    parser.add_argument("--size", type=int, help="--checkpoint: network input size (default: its data.eval_size)")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="--checkpoint: images per forward pass and rank (default: its data.eval_batch_size)",
    )
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), help="--checkpoint: autocast precision (default: its train.amp)"
    )
    parser.add_argument(
        "--workers", type=int, help="--checkpoint: loader processes per rank (default: its data.workers)"
    )
    args = parser.parse_args(argv)
    if args.merge:
        if args.checkpoint or args.pred or args.data or args.gt:
            parser.error(
                "--merge combines earlier results.json and scores nothing: no --checkpoint, --data, --pred or --gt"
            )
        if args.out is None:
            parser.error("--merge needs --out (where the merged results go)")
        if len(args.merge) < 2:
            parser.error(f"--merge needs two or more results.json, got {len(args.merge)}")
        return args
    if bool(args.checkpoint) != bool(args.data):
        parser.error("--checkpoint and --data go together (a checkpoint is scored on shard sets)")
    if bool(args.pred) != bool(args.gt):
        parser.error("--pred and --gt go together (maps are scored against ground-truth folders)")
    if not args.checkpoint and not args.pred:
        parser.error("nothing to score: give --checkpoint with --data, and/or --pred with --gt")
    if args.gallery < 0:
        parser.error(f"--gallery must be 0 (no gallery) or more, got {args.gallery}")
    for flag, value in (("--size", args.size), ("--batch-size", args.batch_size)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be 0 (no intervals) or a number of resamples, got {args.bootstrap}")
    args.command = " ".join([PROG, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    try:
        check_packages(args.metrics)
    except MissingPackageError as e:
        parser.error(f"--metrics: {e}")
    return args


def evaluate_main(args: argparse.Namespace) -> Report:
    args.data_sets = _named(args.data, "dataset", lambda location: open_shard_set(location).name)
    args.gt_sets = _named(args.gt, "dataset", lambda location: Path(location).resolve().name)
    families = [f for f in FAMILIES if f in args.metrics]
    report = Report(
        list(dict.fromkeys([n for n, _ in args.data_sets] + [n for n, _ in args.gt_sets])),
        gallery.GallerySources(args.size, args.precision, Limits(args.max_member_bytes, args.max_pixels)),
    )
    if args.out is not None:
        output_dirs(args.out)
    if args.checkpoint:
        score_checkpoints(args, report, families)
    if args.pred:
        score_folders(args, report, families)
    if dist.is_main():
        if args.bootstrap:
            report.add_uncertainty(args.bootstrap, args.seed)
        report.made = {
            "command": args.command,
            "salnet": salnet.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        report.card = card.metrics_card(
            families,
            maps_read=card.maps_read_text(folders=bool(args.pred), checkpoints=bool(args.checkpoint)),
            bootstrap=report.bootstrap,
        )
        metrics = metric_names(families)
        print(tables.console({d: by for d, by in report.results.items() if by}, metrics), flush=True)
        galleries = {}
        if args.out is not None:
            galleries = write_outputs(report, metrics, args.out, args.plot_format, args.gallery)
            print(
                "evaluate: wrote results.json, results.csv, results.md, results.tex, curves.json, plots/, "
                f"per_image/, gallery/ and index.html to {args.out} (open {args.out / 'index.html'})",
                file=sys.stderr,
                flush=True,
            )
        if args.wandb:  # after every file is written: a W&B failure costs a warning, not the results
            wandb_log.log_evaluation(
                report.document(),
                {d: by for d, by in report.curves.items() if by},
                wandb_log.gallery_pictures(galleries, args.out) if galleries else [],
                scored_configs=report.scored_configs,
                directory=args.out if args.out is not None else Path.cwd(),
            )
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        run_main(
            PROG, lambda: merge_main(args.merge, args.out, lambda d, c, o: write_merged(d, c, o, args.plot_format))
        )
        return
    run_distributed(PROG, lambda: evaluate_main(args))
