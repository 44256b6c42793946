"""index.html of an evaluation: `write_results_page(out_dir, document, curves, galleries)`.

`document` is results.json ("salnet-results/2": made, card, bootstrap, results), `curves` is
curves.json ({dataset: {method: SODMetrics.curves()}}), `galleries` is {dataset: the gallery's
picture set (salnet.pages.pictures)}. Per dataset the page shows:

- the methods x metrics table, sortable by any column; the best value of each metric bold on
  green, the second best on pale green (compared as printed, 4 digits: equal ones share the mark);
  under each value its 95 % interval (results[d][m]["ci95"][metric]), also on hover; a value whose
  paired test against the best gives p >= 1 - level (results[d][m]["p"][metric][best]) is marked
  with '≈': not significantly different from the best;
- the PR curve and the F-measure against the threshold, the values on hover;
- the gallery.

Then the metrics card and how the page was made (command, salnet version, date).
"""

from __future__ import annotations

from pathlib import Path

from salnet.metrics import LOWER_IS_BETTER
from salnet.pages.html import curve_charts, definitions, esc, number, write_page
from salnet.pages.pictures import picture_table

COUNTS = ("images", "missing", "extra", "skipped")  # the counts a row has besides its metrics (not ranked)
PAGE = "index.html"


def metrics_of(by_method: dict[str, dict]) -> list[str]:
    """The metric columns of one dataset's rows, in the order they were written."""
    names: dict[str, None] = {}
    for scores in by_method.values():
        names.update((k, None) for k, v in scores.items() if k not in COUNTS and isinstance(v, int | float))
    return list(names)


def ranks(by_method: dict[str, dict], metric: str) -> dict[str, str]:
    """method -> "best" or "second" for `metric` (values compared as printed), when two or more methods have it."""
    shown = {m: f"{s[metric]:.4f}" for m, s in by_method.items() if isinstance(s.get(metric), int | float)}
    if len(shown) < 2:
        return {}
    order = sorted(set(shown.values()), key=float, reverse=metric not in LOWER_IS_BETTER)
    marks = dict(zip(order, ("best", "second"), strict=False))
    return {m: marks[text] for m, text in shown.items() if text in marks}


def p_value(by_method: dict[str, dict], method: str, other: str, metric: str) -> float | None:
    """The paired test's p-value of `method` against `other` on `metric`, from either side."""
    for a, b in ((method, other), (other, method)):
        p = ((by_method.get(a) or {}).get("p") or {}).get(metric, {}).get(b)
        if isinstance(p, int | float):
            return float(p)
    return None


def _metric_cell(
    by_method: dict[str, dict], method: str, metric: str, mark: str | None, best: str | None, level: float
) -> str:
    scores = by_method[method]
    value = scores.get(metric)
    if not isinstance(value, int | float):
        return "<td data-v=''>-</td>"
    classes, hover, lines = [mark] if mark else [], [], [f"<span class='v'>{number(value)}</span>"]
    interval = (scores.get("ci95") or {}).get(metric)
    if interval:
        lo, hi = interval
        lines.append(f"<span class='ci'>[{number(lo)}, {number(hi)}]</span>")
        hover.append(f"{level:.0%} interval {number(lo)} to {number(hi)}")
    if best is not None and best != method and mark != "best":
        p = p_value(by_method, method, best, metric)
        if p is not None:
            significant = p < 1 - level
            hover.append(f"p = {p:.3g} against {best}" + ("" if significant else ": not significantly different"))
            if not significant:
                classes.append("tie")
    title = f" title='{esc('; '.join(hover))}'" if hover else ""
    css = f" class='{' '.join(classes)}'" if classes else ""
    return f"<td data-v='{value!r}'{css}{title}>{''.join(lines)}</td>"


def results_table(by_method: dict[str, dict], level: float) -> str:
    metrics = metrics_of(by_method)
    head = ["<th data-first='ascending'>method</th>"]
    head += [f"<th data-first='{'ascending' if m in LOWER_IS_BETTER else 'descending'}'>{esc(m)}</th>" for m in metrics]
    head.append("<th data-first='descending'>images</th>")
    marks = {m: ranks(by_method, m) for m in metrics}
    best = {m: next((k for k, v in marks[m].items() if v == "best"), None) for m in metrics}
    rows = []
    for method, scores in by_method.items():
        cells = [f"<td data-v='{esc(method)}'>{esc(method)}</td>"]
        cells += [_metric_cell(by_method, method, m, marks[m].get(method), best[m], level) for m in metrics]
        others = ", ".join(f"{int(scores[k])} {k}" for k in COUNTS[1:] if scores.get(k))
        cells.append(
            f"<td data-v='{int(scores.get('images', 0))}'>{int(scores.get('images', 0))}"
            + (f"<span class='ci'>{esc(others)}</span>" if others else "")
            + "</td>"
        )
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f"<table class='sortable results'><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _how_to_read(bootstrap: dict | None) -> str:
    if not bootstrap:
        return "<p class='note'>No intervals: the evaluation ran with --bootstrap 0.</p>"
    level = bootstrap.get("level", 0.95)
    return (
        f"<p class='note'>Under each value: its {level:.0%} {esc(bootstrap.get('interval', 'percentile'))} interval "
        f"from {esc(bootstrap.get('resamples'))} bootstrap resamples of the images (seed {esc(bootstrap.get('seed'))}). "
        f"Bold on green: the best; pale green: the second best. &#8776;: not significantly different from the best "
        f"({esc(bootstrap.get('test', 'paired test'))} on the same images, p &#8805; {1 - level:.2g}); hover over a "
        "value for its interval and p-value. Click a column header to sort by it; click again to reverse.</p>"
    )


def write_results_page(out_dir: Path, document: dict, curves: dict, galleries: dict[str, dict]) -> Path:
    """Write OUT_DIR/index.html (the module docstring says what it shows); returns its path. Pictures
    the galleries name must already lie under `out_dir`."""
    if not isinstance(document, dict) or not isinstance(document.get("results"), dict):
        raise ValueError("the results document has no 'results' {dataset: {method: scores}} to show")
    bootstrap = document.get("bootstrap")
    level = float((bootstrap or {}).get("level", 0.95))
    body = ["<h1>Evaluation results</h1>", _how_to_read(bootstrap)]
    datasets = [d for d, by in document["results"].items() if by]
    if len(datasets) > 1:
        body.append("<p>" + " &middot; ".join(f"<a href='#d{i}'>{esc(d)}</a>" for i, d in enumerate(datasets)) + "</p>")
    for i, dataset in enumerate(datasets):
        body.append(f"<h2 id='d{i}'>{esc(dataset)}</h2>")
        body.append(results_table(document["results"][dataset], level))
        if curves.get(dataset):
            body.append(curve_charts(dataset, curves[dataset]))
        if galleries.get(dataset):
            body.append(picture_table(galleries[dataset]))
    if document.get("card"):
        body += ["<h2>Metrics card: the definitions behind every number</h2>", definitions(document["card"])]
    if document.get("made"):
        body += ["<h2>How this page was made</h2>", definitions(document["made"])]
    return write_page(Path(out_dir) / PAGE, "Evaluation results", "\n".join(body))
