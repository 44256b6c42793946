"""A run's page, runs/NAME/report/index.html: `write_run_page(out_dir, title, summary, records, latest)`.

It shows the report's summary (steps, time, throughput, best.pt and the best validation of each
set), the validation history (one chart per metric, one line per val set, against the step), the
training loss (every component) and the learning rate, and the latest validation's PR and
F-measure curves and pictures (the fixed panel and the worst images by MAE: image | ground truth |
prediction), written beside the page under pictures/.
"""

from __future__ import annotations

from pathlib import Path

from salnet.pages.html import Axis, Series, curve_charts, esc, line_chart, number, write_page
from salnet.pages.pictures import picture_table, save_picture
from salnet.run.plots import loss_names, series, val_metric_names
from salnet.validate import Sample, SetDetails

PAGE = "index.html"
PICTURES = "pictures"


def history_charts(records: list[dict]) -> str:
    sets, metrics = val_metric_names(records)
    charts = []
    for metric in metrics:
        lines = [Series(s, *series(records, "val", f"{s}/{metric}")) for s in sets]
        charts.append(line_chart(metric, [s for s in lines if s.x], Axis("step"), Axis(metric), markers=True))
    return f"<div class='charts'>{''.join(charts)}</div>"


def training_charts(records: list[dict]) -> str:
    losses = [Series(name, *series(records, "train", name)) for name in loss_names(records)]
    charts = [line_chart("training loss", losses, Axis("step"), Axis("loss"))] if losses else []
    steps, rates = series(records, "train", "lr")
    if steps:
        charts.append(line_chart("learning rate", [Series("lr", steps, rates)], Axis("step"), Axis("lr")))
    return f"<div class='charts'>{''.join(charts)}</div>"


def _picture_rows(root: Path, folder: str, samples: list[Sample]) -> list[dict]:
    rows = []
    for i, s in enumerate(samples):
        cells = [save_picture(root, folder, f"{i:03d}-{part}", getattr(s, part)) for part in ("image", "gt", "pred")]
        caption = "\n".join(f"{k} {number(v)}" for k, v in s.metrics.items())
        rows.append({"key": s.key, "caption": caption, "cells": cells})
    return rows


def panels(root: Path, index: int, details: SetDetails) -> dict:
    """The picture set of one val set's latest panel and worst images, written under root/pictures/."""
    sections = []
    for group, title in (("panel", "the fixed panel"), ("worst", "the worst images by MAE")):
        samples = getattr(details, group)
        if samples:
            rows = _picture_rows(root, f"{PICTURES}/{index}/{group}", samples)
            sections.append({"title": title, "rows": rows})
    return {"columns": ["image", "ground truth", "prediction"], "sections": sections}


def write_run_page(
    out_dir: Path, title: str, summary: str, records: list[dict], latest: tuple[int, dict[str, SetDetails]] | None
) -> Path:
    """Write OUT_DIR/index.html and its pictures; returns the page's path."""
    out_dir = Path(out_dir)
    body = [f"<h1>{esc(title)}</h1>", f"<pre>{esc(summary)}</pre>"]
    if any(r.get("kind") == "val" for r in records):
        body += ["<h2>Validation history</h2>", history_charts(records)]
    else:
        body.append("<p>No validation yet.</p>")
    if any(r.get("kind") == "train" for r in records):
        body += ["<h2>Training</h2>", training_charts(records)]
    if latest is not None:
        step, details = latest
        body.append(f"<h2>Latest validation (step {step})</h2>")
        for index, (name, d) in enumerate(details.items()):
            body.append(f"<h3>{esc(name)}</h3>")
            if d.curves:
                body.append(curve_charts(name, {f"step {step}": d.curves}))
            body.append(picture_table(panels(out_dir, index, d)))
    return write_page(out_dir / PAGE, title, "\n".join(body))
