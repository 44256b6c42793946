"""A run's pictures in runs/NAME/plots/, the same ones W&B shows, for anyone without W&B:

    loss.png           every loss component against the step
    lr.png             the learning rate against the step
    val_metrics.png    each validation metric against the step, one line per val set
    pr_SET.png         the latest validation's PR curve (salnet.metrics.curve_plots draws it)
    fm_SET.png         the latest validation's F-measure against the threshold
    panel_SET.png      the fixed panel: one row per image, image | ground truth | prediction
    worst_SET.png      the K images with the highest MAE, worst first, the same three columns
    latest.npz         what the last four need (curves, pictures, per-image metrics), so that
                       `python -m salnet.report` can draw them again without the network

Everything else is drawn from metrics.jsonl. Figures are matplotlib Figures on the Agg canvas
(no pyplot, no display, no global state); panels are plain pixel mosaics (PIL), so a cell holds
exactly the pixels W&B got.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from salnet.fsio import atomic_write
from salnet.metrics import curve_plots
from salnet.validate import PER_IMAGE_METRICS, Sample, SetDetails

LATEST = "latest.npz"
GUTTER = 4  # white pixels between the cells of a panel
# The numbers of a train record that are not loss components (runlog's train line puts them there).
TRAIN_STATS = frozenset(
    {"epoch", "lr", "grad_norm", "skipped_steps", "images_per_s", "data_wait", "peak_mem_mib", "elapsed_s", "eta_s"}
)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def series(records: Iterable[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of `kind` that have it."""
    pairs = [(r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def loss_names(records: list[dict]) -> list[str]:
    """The loss components of the train records, "loss" (their weighted sum) first."""
    names: dict[str, None] = {}
    for r in records:
        if r.get("kind") == "train":
            names.update(
                (k, None)
                for k, v in r.items()
                if k not in TRAIN_STATS | {"kind", "step"} and isinstance(v, (int, float))
            )
    return sorted(names, key=lambda n: (n != "loss", n))


def loss_figure(records: list[dict]) -> Figure | None:
    names = loss_names(records)
    if not names:
        return None
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for name in names:
        ax.plot(*series(records, "train", name), label=name, linewidth=2 if name == "loss" else 1)
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def lr_figure(records: list[dict]) -> Figure | None:
    steps, values = series(records, "train", "lr")
    if not steps:
        return None
    fig = _figure(6, 3)
    ax = fig.add_subplot()
    ax.plot(steps, values)
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    return fig


def val_metric_names(records: list[dict]) -> tuple[list[str], list[str]]:
    """(val sets, metrics) found in the val records, in logged order."""
    sets: dict[str, None] = {}
    metrics: dict[str, None] = {}
    for r in records:
        if r.get("kind") == "val":
            for key in r:
                set_name, _, metric = key.rpartition("/")
                if set_name and metric != "images":
                    sets[set_name], metrics[metric] = None, None
    return list(sets), list(metrics)


def val_metrics_figure(records: list[dict]) -> Figure | None:
    sets, metrics = val_metric_names(records)
    if not metrics:
        return None
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    fig = _figure(4 * columns, 2.8 * rows)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, columns, i + 1)
        for set_name in sets:
            steps, values = series(records, "val", f"{set_name}/{metric}")
            ax.plot(steps, values, marker="o", markersize=3, label=curve_plots.plot_label(set_name))
        ax.set(title=metric, xlabel="step")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize="small")
    return fig


def _rgb(picture: np.ndarray) -> np.ndarray:
    return np.repeat(picture[..., None], 3, axis=2) if picture.ndim == 2 else picture


def panel_grid(samples: list[Sample]) -> np.ndarray:
    """uint8 [H, W, 3]: one row per sample (image | ground truth | prediction), cells top-left
    aligned in columns as wide as the widest sample, white between them."""
    height = sum(s.image.shape[0] for s in samples) + GUTTER * (len(samples) - 1)
    width = max(s.image.shape[1] for s in samples)
    grid = np.full((height, 3 * width + 2 * GUTTER, 3), 255, dtype=np.uint8)
    top = 0
    for s in samples:
        h, w = s.image.shape[:2]
        for column, picture in enumerate((s.image, s.gt, s.pred)):
            left = column * (width + GUTTER)
            grid[top : top + h, left : left + w] = _rgb(picture)
        top += h + GUTTER
    return grid


def save_png(picture: np.ndarray, path: Path) -> Path:
    with atomic_write(path, "wb") as f:
        Image.fromarray(picture).save(f, format="png")
    return path


def save_figure(fig: Figure, path: Path) -> Path:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


# --------------------------------------------------------------------------------------------
# latest.npz: the newest validation's curves and pictures
# --------------------------------------------------------------------------------------------


def save_latest(path: Path, step: int, details: dict[str, SetDetails]) -> Path:
    """Plain arrays (no pickles): per set j, `j.curves.NAME`, `j.panel.i.image|gt|pred`, `j.worst.i...`,
    `j.per_image` [N, len(PER_IMAGE_METRICS)]; set names, sample keys and their metrics in `meta` (JSON)."""
    arrays: dict[str, np.ndarray] = {}
    meta = {"step": step, "per_image_metrics": list(PER_IMAGE_METRICS), "sets": []}
    for j, (name, d) in enumerate(details.items()):
        for curve, values in d.curves.items():
            arrays[f"{j}.curves.{curve}"] = np.asarray(values, dtype=np.float64)
        entry = {"name": name, "per_image_keys": list(d.per_image)}
        arrays[f"{j}.per_image"] = np.array(
            [[m[n] for n in PER_IMAGE_METRICS] for m in d.per_image.values()], dtype=np.float64
        ).reshape(-1, len(PER_IMAGE_METRICS))
        for group in ("panel", "worst"):
            samples = getattr(d, group)
            entry[group] = [{"key": s.key, "metrics": s.metrics} for s in samples]
            for i, s in enumerate(samples):
                for part in ("image", "gt", "pred"):
                    arrays[f"{j}.{group}.{i}.{part}"] = getattr(s, part)
        meta["sets"].append(entry)
    with atomic_write(path, "wb") as f:
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
    return path


def load_latest(path: Path) -> tuple[int, dict[str, SetDetails]]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        details = {}
        for j, entry in enumerate(meta["sets"]):
            curves = {k.split(".", 2)[2]: z[k].tolist() for k in z.files if k.startswith(f"{j}.curves.")}
            if "threshold" in curves:
                curves["threshold"] = [int(t) for t in curves["threshold"]]
            rows = z[f"{j}.per_image"].tolist()
            per_image = {
                key: dict(zip(meta["per_image_metrics"], row)) for key, row in zip(entry["per_image_keys"], rows)
            }
            groups = {
                group: [
                    Sample(
                        key=s["key"],
                        metrics=s["metrics"],
                        image=z[f"{j}.{group}.{i}.image"],
                        gt=z[f"{j}.{group}.{i}.gt"],
                        pred=z[f"{j}.{group}.{i}.pred"],
                    )
                    for i, s in enumerate(entry[group])
                ]
                for group in ("panel", "worst")
            }
            details[entry["name"]] = SetDetails(curves=curves, per_image=per_image, **groups)
    return meta["step"], details


# --------------------------------------------------------------------------------------------
# Drawing them all
# --------------------------------------------------------------------------------------------


def render(out_dir: Path, records: list[dict], latest: tuple[int, dict[str, SetDetails]] | None) -> list[Path]:
    """Write every picture that `records` (metrics.jsonl) and `latest` ((step, details) of the
    newest validation, or None) have data for; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in (
        ("loss", loss_figure(records)),
        ("lr", lr_figure(records)),
        ("val_metrics", val_metrics_figure(records)),
    ):
        if fig is not None:
            written.append(save_figure(fig, out_dir / f"{name}.png"))
    if latest is not None:
        step, details = latest
        written += curve_plots.save({name: {f"step {step}": d.curves} for name, d in details.items()}, out_dir)
        for name, d in details.items():
            for group in ("panel", "worst"):
                samples = getattr(d, group)
                if samples:
                    written.append(save_png(panel_grid(samples), out_dir / f"{group}_{name}.png"))
    return written
