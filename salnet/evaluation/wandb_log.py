"""`salnet.evaluate --wandb`: an evaluation as a W&B run, grouped with the training run it scored.

`log_evaluation` logs, in one W&B run of job type "evaluate":

- the results table (`results`, a wandb.Table: a row per dataset and method, every metric, the
  image count, and each metric's 95 % interval as METRIC lo / METRIC hi where results.json has them);
  the values also go into the run's summary as DATASET/METHOD/METRIC, so W&B's own run comparison
  can chart them;
- the curves: per dataset one table (method, threshold, precision, recall, F) and two line charts
  with a line per method, `DATASET/pr` (precision over recall) and `DATASET/f_threshold` (F over
  the threshold);
- the gallery: the pictures the results page shows (`gallery`: (caption, file) pairs, so this
  module does not depend on how the gallery is drawn; `gallery_pictures` makes them from the
  gallery's descriptions) under `gallery`;
- the run's config: the metrics card, the bootstrap settings, how the results were made.

Which run: the W&B project, entity and group of the (first) checkpoint scored, read from its config
(log.project, log.entity, and the group and tag a training run uses, its name), so the evaluation
sits in the training run's group; an evaluation of map folders only goes to project `salnet`,
group "evaluate". W&B's own settings apply (WANDB_MODE=offline writes the run under `directory`
with no network; `wandb sync` uploads it). A W&B failure costs a warning, not the evaluation: its
files are written before this runs. Nothing here prints the environment (the API key stays unseen).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from salnet.metrics import metric_names

log = logging.getLogger("salnet.evaluation.wandb_log")

DEFAULT_PROJECT = "salnet"  # LogConfig.project's default
FOLDERS_GROUP = "evaluate"
DEFAULT_TIMEOUT_S = 60.0  # LogConfig.wandb_timeout_s's default
CURVE_COLUMNS = ("threshold", "precision", "recall", "F")


def run_identity(scored_configs: Sequence[dict]) -> dict:
    """wandb.init's project, entity, group, name and tags for an evaluation of checkpoints whose
    resolved configs (best.pt's config) are `scored_configs` (none: folders of maps only)."""
    names = list(dict.fromkeys(str(c.get("name")) for c in scored_configs if c.get("name")))
    if not scored_configs:
        return {"project": DEFAULT_PROJECT, "entity": None, "group": FOLDERS_GROUP, "name": None, "tags": ["evaluate"]}
    section = scored_configs[0].get("log") or {}
    group = names[0] if names else FOLDERS_GROUP
    return {
        "project": section.get("project") or DEFAULT_PROJECT,
        "entity": section.get("entity"),
        "group": group,
        "name": f"evaluate {group}",
        "tags": [*names, "evaluate"],
    }


def results_table_rows(document: dict) -> tuple[list[str], list[list]]:
    """The results table's columns and rows: dataset, method, the metrics, images, the intervals."""
    metrics = metric_names(document["card"].get("families") or [])
    results = document["results"]
    with_ci = [m for m in metrics if any(m in (s.get("ci95") or {}) for by in results.values() for s in by.values())]
    columns = ["dataset", "method", *metrics, "images", *(f"{m} {end}" for m in with_ci for end in ("lo", "hi"))]
    rows = []
    for dataset, by_method in results.items():
        for method, scores in by_method.items():
            ci = scores.get("ci95") or {}
            rows.append(
                [
                    dataset,
                    method,
                    *(scores.get(m) for m in metrics),
                    int(scores.get("images", 0)),
                    *(ci[m][i] if m in ci else None for m in with_ci for i in (0, 1)),
                ]
            )
    return columns, rows


def curve_rows(by_method: dict[str, dict]) -> list[list]:
    """One dataset's curves as rows (method, threshold, precision, recall, F), 256 per method."""
    return [
        [method, *point]
        for method, curves in by_method.items()
        for point in zip(*(curves[c] for c in CURVE_COLUMNS), strict=True)
    ]


def gallery_pictures(descriptions: dict[str, dict], out: Path) -> list[tuple[str, Path]]:
    """The gallery's full-size pictures as (caption, file) pairs, each file once, from the descriptions
    the gallery returns per dataset ({"columns": [...], "sections": [{"title", "rows": [{"key",
    "cells": [{"full": path relative to OUT} or None, one per column]}]}]})."""
    pictures: dict[Path, str] = {}
    for dataset, description in descriptions.items():
        for section in description.get("sections", []):
            for row in section.get("rows", []):
                for column, cell in zip(description.get("columns", []), row.get("cells", []), strict=False):
                    if cell and cell.get("full"):
                        path = Path(out) / cell["full"]
                        pictures.setdefault(path, f"{dataset} | {row.get('key')} | {column} ({section.get('title')})")
    return [(caption, path) for path, caption in pictures.items()]


def log_evaluation(
    document: dict,
    curves: dict,
    gallery: Sequence[tuple[str, Path]],
    *,
    scored_configs: Sequence[dict],
    directory: Path,
    timeout_s: float | None = None,
) -> str | None:
    """Log an evaluation (results.json's `document`, curves.json's `curves`, the gallery's (caption,
    file) pairs) as one W&B run, its files under `directory`/wandb; returns the W&B run's local
    directory, or None when W&B failed (one warning says why). `timeout_s`: the longest wait for W&B
    to start or finish the run (default: the scored run's log.wandb_timeout_s, else 60 s)."""
    try:
        import wandb  # imported only when asked for: it is slow to import
    except ImportError as e:
        log.warning(f"--wandb: wandb cannot be imported ({e}); the evaluation's files are written, W&B is skipped")
        return None
    if timeout_s is None:
        section = (scored_configs[0].get("log") or {}) if scored_configs else {}
        timeout_s = float(section.get("wandb_timeout_s") or DEFAULT_TIMEOUT_S)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            **run_identity(scored_configs),
            dir=str(directory),
            job_type="evaluate",
            config={
                "card": document.get("card"),
                "bootstrap": document.get("bootstrap"),
                "made": document.get("made"),
                "scored_runs": [c.get("name") for c in scored_configs],
            },
            settings=wandb.Settings(init_timeout=timeout_s, finish_timeout=timeout_s),
        )
        columns, rows = results_table_rows(document)
        row = {"results": wandb.Table(columns=columns, data=rows)}
        for dataset, by_method in curves.items():
            table = wandb.Table(columns=["method", *CURVE_COLUMNS], data=curve_rows(by_method))
            row[f"{dataset}/pr"] = wandb.plot.line(
                table, "recall", "precision", stroke="method", title=f"{dataset}: PR curves"
            )
            row[f"{dataset}/f_threshold"] = wandb.plot.line(
                table, "threshold", "F", stroke="method", title=f"{dataset}: F-measure vs threshold"
            )
        if gallery:
            row["gallery"] = [wandb.Image(str(path), caption=caption) for caption, path in gallery]
        run.log(row)
        run.summary.update(
            {
                f"{dataset}/{method}/{metric}": value
                for dataset, by_method in document["results"].items()
                for method, scores in by_method.items()
                for metric, value in scores.items()
                if isinstance(value, (int, float))
            }
        )
        local = run.dir
        run.finish()
        return str(Path(local).parent)
    except Exception as e:
        log.warning(
            f"--wandb: W&B failed ({type(e).__name__}: {e}); the evaluation's files are written; what W&B "
            f"stored locally is under {directory / 'wandb'} (`wandb sync` uploads it)"
        )
        try:
            wandb.teardown()
        except Exception:
            pass
        return None
