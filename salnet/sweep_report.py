"""The sweep's table: `python -m salnet.report --sweep runs/SWEEP [--sort METRIC]`.

One row per cell of the manifest (salnet.sweep): its values, state, steps done, and the best of each
val set in the primary metric (eval.best_metric) and in the --sort metric, best first; printed, and
written beside the manifest as sweep.csv, sweep.md and a sortable page, index.html.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from salnet.config import MEAN_OVER_SETS, Config
from salnet.fsio import atomic_write
from salnet.metrics.names import is_better
from salnet.pages.sweep import write_sweep_page
from salnet.sweep import STATES, SweepDir, SweepError, states, value_text


def primary_key(cfg: Config | None, vals: list[dict]) -> str | None:
    """The SET/METRIC that decides best.pt (eval.best_metric; METRIC alone: the mean over sets, or the one set)."""
    if cfg is not None:
        from salnet.validate import best_key  # (torch comes with it: only when a table is made)

        return best_key(cfg)
    logged = [k for r in vals for k in r if "/" in k]
    return next((k for k in logged if k.endswith("/maxF")), logged[0] if logged else None)


def best_values(vals: list[dict], metric: str) -> dict[str, float]:
    """{SET/METRIC: its best value over the run's validations}, for every set that logged `metric`."""
    best: dict[str, float] = {}
    for r in vals:
        for key, value in r.items():
            if key.rpartition("/")[2] == metric and is_better(metric, value, best.get(key)):
                best[key] = value
    return best


def sweep_table(root: Path, sort: str | None = None) -> tuple[list[str], list[list[Any]], str]:
    """(header, rows, the column sorted by): one row per cell of runs/SWEEP's manifest: its values, state,
    steps, and the best of each val set in the primary metric (eval.best_metric) and in the `sort` metric
    (SET/METRIC, or METRIC: the primary set's); best first by `sort` (default: the primary), cells
    without that value last."""
    sweep_dir = SweepDir(root)
    manifest = sweep_dir.read()
    if not manifest:
        raise SweepError(f"{sweep_dir.manifest} not found: {root} is not a sweep directory (launch/submit.py --sweep)")
    entries = manifest["cells"]
    found = states(sweep_dir, entries)
    keys = list(dict.fromkeys(k for e in entries for k in e.get("values", {})))
    vals = {e["name"]: found[e["name"]][1]["vals"] for e in entries}
    primary = next((pk for e in entries if (pk := primary_key(found[e["name"]][1]["config"], vals[e["name"]]))), None)
    sort_key = sort if sort and "/" in sort else f"{(primary or 'val/').rpartition('/')[0]}/{sort}" if sort else primary
    metrics = list(dict.fromkeys(k.rpartition("/")[2] for k in (primary, sort_key) if k))
    bests = {
        name: {k: v for m in metrics for k, v in best_values(records, m).items()} for name, records in vals.items()
    }
    # one column per SET/METRIC, the primary metric's first, the mean over sets after the sets
    order = {m: i for i, m in enumerate(metrics)}
    columns = sorted(
        {k for b in bests.values() for k in b},
        key=lambda k: (order[k.rpartition("/")[2]], k.startswith(MEAN_OVER_SETS + "/"), k),
    )
    if sort and sort_key not in columns:
        logged = sorted({k for v in vals.values() for r in v for k in r if "/" in k and not k.endswith("/images")})
        raise SweepError(
            f"--sort {sort!r}: no cell logged {sort_key}; the cells logged "
            + (", ".join(logged) if logged else "no validation yet")
        )
    header = ["cell", *keys, "state", "steps", *(f"best {c}" for c in columns)]
    rows = []
    for entry in entries:
        state, progress = found[entry["name"]]
        if not entry.get("in_grid", True):
            state += " (removed from the grid)"
        steps = f"{progress['step']}/{progress['total']}" if progress["total"] else str(progress["step"])
        values = [value_text(entry["values"][k]) if k in entry["values"] else "" for k in keys]
        rows.append([entry["name"], *values, state, steps, *(bests[entry["name"]].get(c) for c in columns)])
    if sort_key in columns:
        at, metric = header.index(f"best {sort_key}"), sort_key.rpartition("/")[2]
        have = [r for r in rows if r[at] is not None]
        # best first: sorted on the metric's own direction (is_better), ties in manifest order
        ranked = sorted(have, key=lambda r: r[at], reverse=is_better(metric, 1.0, 0.0))
        rows = ranked + [r for r in rows if r[at] is None]
    return header, rows, sort_key if sort_key in columns else ""


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def table_text(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def table_markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def table_csv(header: list[str], rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in r] for r in rows])
    return out.getvalue()


def sweep_report_main(path: Path, sort: str | None = None) -> int:
    """`python -m salnet.report --sweep runs/SWEEP [--sort METRIC]`: print the table, write sweep.csv,
    sweep.md and the sortable page index.html next to the manifest. 0, or 2 with the reason on stderr (not a sweep, an unknown --sort)."""
    import sys

    try:
        header, rows, sorted_by = sweep_table(Path(path), sort)
    except SweepError as e:
        print(f"python -m salnet.report --sweep: {e}", file=sys.stderr)
        return 2
    root = Path(path)
    with atomic_write(root / "sweep.csv") as f:
        f.write(table_csv(header, rows))
    with atomic_write(root / "sweep.md") as f:
        f.write(
            f"# sweep {root.name}\n\nbest first by {sorted_by or 'manifest order'}\n\n" + table_markdown(header, rows)
        )
    page = write_sweep_page(root, header, rows, sorted_by)
    counts = {s: sum(1 for r in rows if r[header.index("state")].split(" ")[0] == s) for s in (*STATES, "unknown")}
    print(f"sweep {root}: {len(rows)} cell(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    print(f"sorted by {sorted_by}, best first" if sorted_by else "in manifest order (no validation yet)")
    print(table_text(header, rows))
    print(f"written: {root / 'sweep.csv'}, {root / 'sweep.md'}")
    print(f"page: {page}")
    return 0
