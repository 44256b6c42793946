"""The results of `salnet.evaluate` as tables: console, CSV, Markdown and LaTeX.

`results` is {dataset: {method: {metric: value, "images": n, ...}}}; tables show `metrics` in the
given order. Within a dataset the best value of each metric is marked when two or more methods
are compared (bold in Markdown and LaTeX, '*' on the console); MAE is best when lowest.

With the bootstrap's results (each method's "ci95": {metric: [lo, hi]} and "p": {metric: {other
method: p}}, from `salnet.evaluate --bootstrap`), every value also shows its 95 % interval: on the
console a second line under the method's row, in Markdown beside the value (`0.9123 [0.9001,
0.9240]`), in LaTeX in small type beside it, in CSV as METRIC_lo and METRIC_hi columns. A value
whose difference from its column's best is not significant at 0.05 (paired test) is marked with a
dagger, and a legend line under each table says so. Without them the tables are as before.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable

from salnet.metrics import LOWER_IS_BETTER

Results = dict[str, dict[str, dict[str, float]]]
COUNTS = ("images", "missing", "extra", "skipped")
ALPHA = 0.05  # the significance level of the dagger
DAGGER = "\u2020"
LEGEND = (
    f"{DAGGER} not significantly different from the best in its column (paired permutation test, p \u2265 {ALPHA}); "
    "[lo, hi]: 95 % bootstrap interval over images"
)


def _best(by_method: dict[str, dict[str, float]], metric: str) -> float | None:
    values = [scores[metric] for scores in by_method.values() if metric in scores]
    if len(values) < 2:
        return None
    return min(values) if metric in LOWER_IS_BETTER else max(values)


def has_intervals(results: Results) -> bool:
    """Whether the results carry the bootstrap's intervals (evaluate --bootstrap N > 0)."""
    return any("ci95" in scores for by in results.values() for scores in by.values())


def _interval(scores: dict, metric: str, digits: int) -> str | None:
    bounds = (scores.get("ci95") or {}).get(metric)
    return None if bounds is None else f"[{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _not_significant(by_method: dict[str, dict], method: str, metric: str, best_methods: list[str]) -> bool:
    """Whether `method` (not itself a best) is within noise of a best method of the column: p >= ALPHA."""
    if method in best_methods:
        return False
    p = (by_method[method].get("p") or {}).get(metric) or {}
    return any(p.get(best, 0.0) >= ALPHA for best in best_methods)


def _cells(
    by_method: dict[str, dict[str, float]],
    metrics: list[str],
    digits: int,
    mark: Callable[[str], str],
    dagger: Callable[[str], str] = lambda t: t + DAGGER,
    interval: Callable[[str, str], str] | None = None,
) -> list[list[str]]:
    """One row per method: name, then each metric's value, marked with `mark(text)` where it is the
    best and `dagger(text)` where it is not significantly worse than the best; with `interval`, each
    value with its interval as `interval(value, "[lo, hi]")`."""
    # Compared as printed: values equal to the shown digits are tied, and all of them are marked.
    best = {m: None if (b := _best(by_method, m)) is None else f"{b:.{digits}f}" for m in metrics}
    shown = {
        method: {m: f"{scores[m]:.{digits}f}" for m in metrics if m in scores} for method, scores in by_method.items()
    }
    rows = []
    for method, scores in by_method.items():
        row = [method]
        for m in metrics:
            text = shown[method].get(m, "-")
            best_methods = [other for other in by_method if best[m] is not None and shown[other].get(m) == best[m]]
            if text == best[m]:
                text = mark(text)
            elif _not_significant(by_method, method, m, best_methods):
                text = dagger(text)
            bounds = _interval(scores, m, digits)
            row.append(interval(text, bounds) if interval is not None and bounds is not None else text)
        rows.append(row)
    return rows


def _count_cell(scores: dict[str, float]) -> str:
    """'5019', or '5000 (19 missing, 2 extra, 1 skipped)' for maps scored with --allow-missing or --skip-bad."""
    others = [f"{int(scores[key])} {key}" for key in COUNTS[1:] if scores.get(key)]
    return f"{int(scores.get('images', 0))}" + (f" ({', '.join(others)})" if others else "")


def _counted_rows(by_method: dict[str, dict[str, float]], metrics: list[str], mark, interval=None) -> list[list[str]]:
    """_cells with 4 digits, each row ending in the method's image count."""
    cells = _cells(by_method, metrics, 4, mark, interval=interval)
    return [row + [_count_cell(scores)] for row, scores in zip(cells, by_method.values(), strict=True)]


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def console(results: Results, metrics: list[str]) -> str:
    """A block per dataset; with intervals, each method's row has a second line of them under its values."""
    blocks = []
    intervals = has_intervals(results)
    for dataset, by_method in results.items():
        rows = [["method", *metrics, "images"]]
        for row, scores in zip(_counted_rows(by_method, metrics, lambda t: t + "*"), by_method.values(), strict=True):
            rows.append(row)
            if intervals:
                rows.append(["", *(_interval(scores, m, 4) or "" for m in metrics), ""])
        blocks.append(f"{dataset}\n" + _aligned(rows) + (f"\n{LEGEND}" if intervals else ""))
    return "\n\n".join(blocks)


def csv_text(results: Results, metrics: list[str]) -> str:
    """One row per (dataset, method) with full-precision values and the image counts. Names are quoted,
    so a name holding '#' survives pandas' comment="#" (the metrics card's lines above the table)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    counts = [c for c in COUNTS if any(c in s for by in results.values() for s in by.values())]
    bounds = ("", "_lo", "_hi") if has_intervals(results) else ("",)
    csv.writer(out, lineterminator="\n").writerow(
        ["dataset", "method", *(m + b for m in metrics for b in bounds), *counts]
    )
    for dataset, by_method in results.items():
        for method, scores in by_method.items():
            ci95 = scores.get("ci95") or {}
            writer.writerow(
                [
                    dataset,
                    method,
                    *(
                        "" if value is None else float(value)
                        for m in metrics
                        for value in [scores.get(m), *ci95.get(m, (None, None))][: len(bounds)]
                    ),
                    *(int(scores.get(c, 0)) for c in counts),
                ]
            )
    return out.getvalue()


def _one_line(text: str) -> str:
    """Control characters (a newline in a folder name) as spaces: a table row is one line."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


# Markdown's markup characters, '|' (a table's column separator) and '$' (math on GitHub) included.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~$])")


def md_escape(text: str) -> str:
    """`text` shown as itself in Markdown: every markup character backslash-escaped (CommonMark)."""
    return _MD_SPECIAL.sub(r"\\\1", _one_line(text))


def markdown(results: Results, metrics: list[str]) -> str:
    blocks = []
    for dataset, by_method in results.items():
        lines = [
            f"### {md_escape(dataset)}",
            "",
            "| method | " + " | ".join(metrics) + " | images |",
            "|:--|" + "--:|" * (len(metrics) + 1),
        ]
        rows = _counted_rows(by_method, metrics, lambda t: f"**{t}**", interval=lambda t, i: f"{t} {i}")
        lines += ["| " + " | ".join([md_escape(row[0]), *row[1:]]) + " |" for row in rows]
        if has_intervals({dataset: by_method}):
            lines += ["", LEGEND]  # plain text in CommonMark: no markup character in it
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in _one_line(text))


def latex(results: Results, metrics: list[str]) -> str:
    """A paper table (booktabs): a row per method, a column group per dataset, 3 decimals, best in bold."""
    datasets = list(results)
    methods = list(dict.fromkeys(m for by in results.values() for m in by))
    arrows = {m: r"$\downarrow$" if m in LOWER_IS_BETTER else r"$\uparrow$" for m in metrics}
    lines = [
        r"% \usepackage{booktabs}",
        r"\begin{tabular}{l" + ("|" + "c" * len(metrics)) * len(datasets) + "}",
        r"\toprule",
    ]
    lines.append(
        "Method & " + " & ".join(rf"\multicolumn{{{len(metrics)}}}{{c}}{{{tex_escape(d)}}}" for d in datasets) + r" \\"
    )
    lines.append(" & " + " & ".join(f"{tex_escape(m)}{arrows[m]}" for _ in datasets for m in metrics) + r" \\")
    lines.append(r"\midrule")
    cells = {
        d: {
            row[0]: row[1:]
            for row in _cells(
                by,
                metrics,
                3,
                lambda t: rf"\textbf{{{t}}}",
                dagger=lambda t: rf"{t}$^\dagger$",
                interval=lambda t, i: rf"{t}\,{{\scriptsize{i}}}",
            )
        }
        for d, by in results.items()
    }
    for method in methods:
        values = [v for d in datasets for v in cells[d].get(method, ["-"] * len(metrics))]
        lines.append(f"{tex_escape(method)} & " + " & ".join(values) + r" \\")
    lines.append(r"\bottomrule")
    if has_intervals(results):
        legend = tex_escape(LEGEND.removeprefix(DAGGER)).replace("\u2265", r"$\geq$")
        lines.append(rf"\multicolumn{{{1 + len(metrics) * len(datasets)}}}{{l}}{{\footnotesize $^\dagger${legend}}} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"
