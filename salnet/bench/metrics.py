"""`python -m salnet.bench metrics`: salnet.metrics against PySODMetrics on the same images, same run.

Two workloads: F+E+S+MAE together (what validation computes by default) and wF alone (the one
that needs a host-side distance transform). Both sides get the same random prediction/GT pairs:
PySODMetrics the predictions saved as 8-bit arrays (that conversion is not timed), salnet the
float probabilities. One CPU thread (torch's; the reference's numpy/scipy paths are
single-threaded). Each side is timed over all images, the two alternating, median of the repeats; the largest absolute
difference between the two sides' values is reported with the speeds. Last line: one JSON object.
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import torch

from salnet.bench._harness import emit, interleaved, medians, parser, timed
from salnet.metrics import SODMetrics

WORKLOADS = {"F+E+S+MAE": ("F", "E", "S", "MAE"), "wF": ("wF",)}


def main(argv: list[str]) -> None:
    cli = parser("metrics", __doc__.splitlines()[0])
    cli.add_argument("--images", type=int, default=200)
    cli.add_argument("--height", type=int, default=300)
    cli.add_argument("--width", type=int, default=400)
    cli.add_argument("--batch", type=int, default=16, help="images per SODMetrics.update call")
    cli.add_argument("--device", default="cpu", help="where salnet runs (the reference always runs on the CPU)")
    cli.add_argument("--seed", type=int, default=0)
    args = cli.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)

    preds, gts = random_pairs(args.images, args.height, args.width, args.seed)
    preds_u8 = [(p * 255).astype(np.uint8) for p in preds.numpy()]  # the saved PNGs
    gts_u8 = list(gts.numpy())
    preds_dev, gts_dev = preds.to(device), gts.to(device)

    report = {
        "benchmark": "metrics",
        "images": args.images,
        "height": args.height,
        "width": args.width,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    print(
        f"{args.images} pairs of {args.height}x{args.width}, salnet on {device} in batches of {args.batch}, "
        f"{torch.get_num_threads()} thread(s), median of {args.repeats}"
    )
    for name, families in WORKLOADS.items():
        sides = {
            "salnet": partial(run_salnet, families, preds_dev, gts_dev, args.batch, device),
            "reference": partial(run_reference, families, preds_u8, gts_u8),
        }
        runs = interleaved(
            args.repeats, {side: lambda _, run=run: timed(run) for side, run in sides.items()}
        )  # (values, seconds)
        (ours, _), (theirs, _) = runs["salnet"][-1], runs["reference"][-1]
        seconds = medians({side: [s for _, s in results] for side, results in runs.items()})
        our_s, their_s = seconds["salnet"], seconds["reference"]
        row = {
            "salnet_images_per_s": args.images / our_s,
            "pysodmetrics_images_per_s": args.images / their_s,
            "speedup": their_s / our_s,
            "max_abs_diff": max(abs(ours[k] - theirs[k]) for k in theirs),
        }
        report[name] = row
        print(
            f"{name:10s} salnet {row['salnet_images_per_s']:8.1f} img/s   PySODMetrics "
            f"{row['pysodmetrics_images_per_s']:7.1f} img/s   x{row['speedup']:.1f}   max |diff| {row['max_abs_diff']:.2e}"
        )
    emit(report)


def random_pairs(count: int, height: int, width: int, seed: int):
    """float32 predictions in [0, 1] and uint8 0/255 masks: one to three random ellipses per mask,
    the prediction a noisy version of its mask (so every metric has something to measure)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    for i in range(count):
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            cy, cx, ry, rx = (
                torch.rand(4, generator=gen) * torch.tensor([height, width, height / 3, width / 3])
            ).tolist()
            masks[i] |= ((rows - cy) / (ry + 1)) ** 2 + ((cols - cx) / (rx + 1)) ** 2 <= 1
    noise = torch.rand(count, height, width, generator=gen)
    preds = 0.5 * masks.float() + 0.5 * noise
    return preds, masks.to(torch.uint8) * 255


def run_salnet(families, preds: torch.Tensor, gts: torch.Tensor, batch: int, device: torch.device) -> dict:
    metrics = SODMetrics(families, device=device)
    for start in range(0, preds.shape[0], batch):
        metrics.update(preds[start : start + batch], gts[start : start + batch])
    return metrics.compute()  # ends with a device-to-host copy, so GPU time is included


def run_reference(families, preds_u8: list, gts_u8: list) -> dict:
    """PySODMetrics 1.6.2 on the saved maps and masks, as salnet's keys (`reference_values`)."""
    import py_sod_metrics as ref

    handlers = {"IoU": ref.IOUHandler, "Dice": ref.DICEHandler, "BER": ref.BERHandler}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Fmeasure will be removed": it is still the 1.6.2 reference
        makers = {
            "F": ref.Fmeasure,
            "E": ref.Emeasure,
            "S": ref.Smeasure,
            "wF": ref.WeightedFmeasure,
            "MAE": ref.MAE,
            **{
                f: lambda h=h: ref.FmeasureV2({"m": h(with_dynamic=True, with_adaptive=True)})
                for f, h in handlers.items()
            },
            "MSIoU": lambda: ref.MSIoU(with_dynamic=True, with_adaptive=True),
            "SI-MAE": ref.SizeInvarianceMAE,
            "SI-F": lambda: ref.SizeInvarianceFmeasureV2(
                {"m": ref.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3)}
            ),
            "HCE": ref.HumanCorrectionEffortMeasure,
        }
        evaluators = {f: makers[f]() for f in families}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`trapz` is deprecated", DeprecationWarning)  # in MSIoU
        for pred, gt in zip(preds_u8, gts_u8):
            for evaluator in evaluators.values():
                evaluator.step(pred, gt)
    return reference_values({f: e.get_results() for f, e in evaluators.items()})


def reference_values(results: dict) -> dict:
    """PySODMetrics' get_results() per family -> salnet's keys."""
    out = {}
    for family, key, curve_key in (("F", "fm", "F"), ("E", "em", "E")):
        if family in results:
            curve = results[family][key]
            out.update(
                {
                    f"max{curve_key}": float(curve["curve"].max()),
                    f"mean{curve_key}": float(curve["curve"].mean()),
                    f"adp{curve_key}": float(curve["adp"]),
                }
            )
    for family, key in (("S", "sm"), ("wF", "wfm"), ("MAE", "mae"), ("SI-MAE", "si_mae"), ("HCE", "hce")):
        if family in results:
            out[family] = float(results[family][key])
    for family in ("IoU", "Dice", "BER", "MSIoU"):
        if family in results:
            values = results[family].get("m", results[family])  # FmeasureV2 keys by handler
            curve = values["dynamic"]
            out.update(
                {
                    f"max{family}": float(curve.max()),
                    f"mean{family}": float(curve.mean()),
                    f"adp{family}": float(values["adaptive"]),
                }
            )
    if "SI-F" in results:
        values = results["SI-F"]["m"]  # dynamic: per image, an objects x 256 array
        out["SI-maxF"] = float(np.mean([s.max(axis=-1).mean() for s in values["dynamic"]]))
        out["SI-meanF"] = float(np.mean([s.mean(axis=-1).mean() for s in values["dynamic"]]))
        out["SI-adpF"] = float(values["adaptive"])
    return out
