"""The sweep's page: `python -m salnet.report --sweep runs/SWEEP` writes runs/SWEEP/index.html, the
table of every cell (its values, state, steps, best validation), sortable by any column like the
results page's tables, best first by the metric the console table was sorted by."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from salnet.metrics import LOWER_IS_BETTER
from salnet.pages.html import esc, write_page

BEST = "best "  # the sweep table's prefix of a validation column ("best val/maxF")


def _first_direction(column: str) -> str:
    """A click on a header sorts best first: lower-is-better metrics ascending, other metrics descending."""
    if not column.startswith(BEST):
        return "ascending"
    return "ascending" if column.rpartition("/")[2] in LOWER_IS_BETTER else "descending"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "<td data-v=''>-</td>"
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    return f"<td data-v='{esc(value)}'>{esc(shown)}</td>"


def write_sweep_page(root: Path, header: list[str], rows: list[list[Any]], sorted_by: str) -> Path:
    """runs/SWEEP/index.html from `salnet.sweep_report.sweep_table`'s (header, rows, sorted_by)."""
    head = "".join(f"<th data-first='{_first_direction(c)}'>{esc(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    order = f"best first by {esc(sorted_by)}" if sorted_by else "in the manifest's order (no validation yet)"
    page = (
        f"<h1>Sweep {esc(root.name)}</h1>"
        f"<p class='note'>{len(rows)} cell(s), {order}. Click a column header to sort by it (best first); "
        "click again to reverse. Each cell's run directory is runs/SWEEP/CELL; "
        "<code>python -m salnet.report runs/SWEEP/CELL --html</code> writes its own page.</p>"
        f"<table class='sortable sweep'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )
    return write_page(root / "index.html", f"sweep {root.name}", page)
