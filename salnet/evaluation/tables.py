"""The results of `salnet.evaluate` as tables: console, CSV, Markdown and LaTeX.

`results` is {dataset: {method: {metric: value, "images": n, ...}}}; tables show `metrics` in the
given order. Within a dataset the best value of each metric is marked when two or more methods
are compared (bold in Markdown and LaTeX, '*' on the console); MAE is best when lowest.
"""

from __future__ import annotations

import csv
import io
import re

from salnet.metrics import LOWER_IS_BETTER

Results = dict[str, dict[str, dict[str, float]]]
COUNTS = ("images", "missing", "extra", "skipped")


def _best(by_method: dict[str, dict[str, float]], metric: str) -> float | None:
    values = [scores[metric] for scores in by_method.values() if metric in scores]
    if len(values) < 2:
        return None
    return min(values) if metric in LOWER_IS_BETTER else max(values)


def _cells(by_method: dict[str, dict[str, float]], metrics: list[str], digits: int, mark) -> list[list[str]]:
    """One row per method: name, then each metric's value, marked with `mark(text)` where it is the best."""
    # Compared as printed: values equal to the shown digits are tied, and all of them are marked.
    best = {m: None if (b := _best(by_method, m)) is None else f"{b:.{digits}f}" for m in metrics}
    rows = []
    for method, scores in by_method.items():
        row = [method]
        for m in metrics:
            text = f"{scores[m]:.{digits}f}" if m in scores else "-"
            row.append(mark(text) if text == best[m] else text)
        rows.append(row)
    return rows


def _count_cell(scores: dict[str, float]) -> str:
    """'5019', or '5000 (19 missing, 2 extra, 1 skipped)' for maps scored with --allow-missing or --skip-bad."""
    others = [f"{int(scores[key])} {key}" for key in COUNTS[1:] if scores.get(key)]
    return f"{int(scores.get('images', 0))}" + (f" ({', '.join(others)})" if others else "")


def _counted_rows(by_method: dict[str, dict[str, float]], metrics: list[str], mark) -> list[list[str]]:
    """_cells with 4 digits, each row ending in the method's image count."""
    cells = _cells(by_method, metrics, 4, mark)
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
    blocks = []
    for dataset, by_method in results.items():
        rows = [["method", *metrics, "images"], *_counted_rows(by_method, metrics, lambda t: t + "*")]
        blocks.append(f"{dataset}\n" + _aligned(rows))
    return "\n\n".join(blocks)


def csv_text(results: Results, metrics: list[str]) -> str:
    """One row per (dataset, method) with full-precision values and the image counts."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    counts = [c for c in COUNTS if any(c in s for by in results.values() for s in by.values())]
    writer.writerow(["dataset", "method", *metrics, *counts])
    for dataset, by_method in results.items():
        for method, scores in by_method.items():
            writer.writerow(
                [
                    dataset,
                    method,
                    *(repr(scores[m]) if m in scores else "" for m in metrics),
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
        rows = _counted_rows(by_method, metrics, lambda t: f"**{t}**")
        lines += ["| " + " | ".join([md_escape(row[0]), *row[1:]]) + " |" for row in rows]
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
        d: {row[0]: row[1:] for row in _cells(by, metrics, 3, lambda t: rf"\textbf{{{t}}}")}
        for d, by in results.items()
    }
    for method in methods:
        values = [v for d in datasets for v in cells[d].get(method, ["-"] * len(metrics))]
        lines.append(f"{tex_escape(method)} & " + " & ".join(values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
