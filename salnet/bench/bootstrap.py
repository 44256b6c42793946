"""`python -m salnet.bench bootstrap`: 95 % intervals and paired tests of a DUTS-TE-sized comparison on one core.

The workload of `salnet.evaluate --bootstrap 1000` on one dataset: 5,019 images x 5 methods with the
default families (F, E, S, wF, MAE: per image the F and E curves at 256 thresholds, float32, as
`PerImage` keeps them, and the scalars), 1,000 resamples for every method's intervals and 1,000
permutations for each of the 10 pairs' tests. The rows are random (the time does not depend on the
values). One CPU thread (torch.set_num_threads(1)).

Stages, each timed on its own (median of the repeats): `draws` (the resample counts and the
permutation swaps), `intervals` (every method's resampled means by one matrix product, metrics,
quantiles), `paired` (every pair's swapped means and p-values), and `total`, `bootstrap()` end to
end. Baseline in the same run: the same intervals with a Python loop over resamples (each
resample's means by indexing the drawn images), timed on --loop-resamples and scaled to the full
count. Last line: one JSON object.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from salnet.bench._harness import emit, interleaved, machine, medians, parser, ratio, timed
from salnet.metrics.bootstrap import Draws, bootstrap, field_matrix, intervals, metrics_of_means, paired_p_values
from salnet.metrics.histogram import LEVELS
from salnet.metrics.names import DEFAULT_FAMILIES
from salnet.metrics.per_image import PerImage, needed_fields

CURVES = ("precision", "recall", "F", "E")
SCALARS = ("adpF", "adpE", "S", "wF", "MAE")


def random_rows(images: int, methods: int, seed: int) -> dict[str, PerImage]:
    rng = np.random.default_rng(seed)
    keys = [f"{i:06d}" for i in range(images)]
    out = {}
    for m in range(methods):
        values = {name: rng.random((images, LEVELS), dtype=np.float32) for name in CURVES}
        values.update({name: rng.random(images) for name in SCALARS})
        out[f"method{m}"] = PerImage(DEFAULT_FAMILIES, keys, values)
    return out


def looped_intervals(rows: PerImage, resamples: int, seed: int) -> None:
    """The baseline: one resample at a time, its means by indexing the drawn images."""
    fields = needed_fields(rows.families)
    x, layout = field_matrix(rows, fields)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        drawn = torch.randint(n, (n,), generator=gen)
        values.append(metrics_of_means(x[drawn].mean(0), layout, rows.families))
    for name in values[0]:
        torch.quantile(torch.stack([v[name] for v in values]), torch.tensor([0.025, 0.975], dtype=torch.float64))


def main(argv: list[str]) -> None:
    cli = parser("bootstrap", __doc__.splitlines()[0], repeats=5)
    cli.add_argument("--images", type=int, default=5019, help="images per method (default 5019, DUTS-TE)")
    cli.add_argument("--methods", type=int, default=5, help="methods compared (default 5)")
    cli.add_argument("--resamples", type=int, default=1000, help="resamples and permutations (default 1000)")
    cli.add_argument(
        "--loop-resamples", type=int, default=20, help="resamples the looped baseline runs (default 20; 0: skip it)"
    )
    args = cli.parse_args(argv)
    torch.set_num_threads(1)
    rows = random_rows(args.images, args.methods, seed=0)
    first = next(iter(rows.values()))
    pairs = list(itertools.combinations(rows, 2))

    def draws(repeat: int):
        d = Draws(args.resamples, seed=repeat)
        d.counts(args.images), d.swaps(args.images)
        return d

    def stages(repeat: int) -> dict[str, float]:
        d, draw_s = timed(lambda: draws(repeat))
        _, interval_s = timed(lambda: [intervals(r, d) for r in rows.values()])
        _, paired_s = timed(lambda: [paired_p_values(rows[a], rows[b], d) for a, b in pairs])
        _, total_s = timed(lambda: bootstrap(rows, args.resamples, seed=repeat))
        return {"draws": draw_s, "intervals": interval_s, "paired": paired_s, "total": total_s}

    contenders = {"vectorised": stages}
    if args.loop_resamples:
        contenders["looped"] = lambda repeat: timed(lambda: looped_intervals(first, args.loop_resamples, repeat))[1]
    print(
        f"{args.images} images x {args.methods} methods, {args.resamples} resamples, {len(pairs)} pairs, "
        f"{torch.get_num_threads()} thread, median of {args.repeats}",
        flush=True,
    )
    runs = interleaved(args.repeats, contenders)
    seconds = medians({stage: [r[stage] for r in runs["vectorised"]] for stage in runs["vectorised"][0]})
    report = {
        "benchmark": "bootstrap",
        "images": args.images,
        "methods": args.methods,
        "resamples": args.resamples,
        "pairs": len(pairs),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        **machine(),
        "seconds": {stage: round(s, 3) for stage, s in seconds.items()},
    }
    for stage, s in seconds.items():
        print(f"{stage:10s} {s:7.3f} s")
    if args.loop_resamples:
        # The loop's time per resample, for one method's intervals, scaled to all resamples and methods.
        per_resample = medians({"looped": runs["looped"]})["looped"] / args.loop_resamples
        looped_s = per_resample * args.resamples * args.methods
        report["looped_intervals_s"] = round(looped_s, 2)
        report["intervals_speedup"] = ratio(looped_s, seconds["intervals"])
        print(
            f"looped intervals (baseline, from {args.loop_resamples} resamples): {looped_s:.2f} s, "
            f"x{report['intervals_speedup']} slower than the matrix product"
        )
    emit(report)
