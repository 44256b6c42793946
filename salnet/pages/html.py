"""The page skeleton, escaping, and line charts as inline SVG with the values on hover.

A chart is an <svg class="chart"> whose series also travel as JSON in its data-series attribute:
the script finds the point nearest the pointer (in the chart's own coordinates) and shows its
series, x and y (and the point's label, e.g. the threshold) in a tooltip built with textContent,
so no user text is ever parsed as HTML. Tables with class "sortable" re-sort on a click of a
header (best first), and the other way round on a second click.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from salnet.fsio import atomic_write

# Colour first (salnet.metrics.curve_plots' order), then dash pattern: eleven lines and more stay apart.
COLOURS = (
    "#d62728",
    "#1f77b4",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
DASHES = ("", "6 3", "2 3", "8 3 2 3")

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.25em;border-bottom:1px solid #ccc;margin-top:2em} h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0} th,td{padding:.25em .6em;border-bottom:1px solid #e4e4e4;text-align:right}
th:first-child,td:first-child{text-align:left}
table.sortable th{cursor:pointer;user-select:none;background:#f4f4f4}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"} table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
td .ci{display:block;font-size:.75em;color:#777;white-space:nowrap}
td.best{font-weight:bold;background:#e6f4e6} td.second{background:#f3f8e8}
td.tie .v::after{content:" \\2248";color:#a60}
.legend span{margin-right:1.2em;white-space:nowrap} .legend i{display:inline-block;width:1.6em;height:3px;vertical-align:middle;margin-right:.3em}
.charts{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0;width:min-content} figcaption{font-size:.9em;color:#555}
svg.chart{background:#fff;border:1px solid #ddd} svg.chart text{font-size:11px;fill:#444}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;padding:.3em .5em;border-radius:3px;font-size:12px;display:none;white-space:pre;z-index:9}
table.pictures td{text-align:center;vertical-align:top;font-size:.8em} table.pictures td:first-child{white-space:pre-line} table.pictures img{display:block;max-width:160px;max-height:160px;border:1px solid #ccc}
dl.card{display:grid;grid-template-columns:max-content auto;gap:.2em 1em} dl.card dt{font-weight:bold} dl.card dd{margin:0}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto}
.note{color:#666;font-size:.9em}
"""

SCRIPT = """
(function(){
const tip=document.getElementById('tip');
function fmt(v){return Math.abs(v)>=1000||Number.isInteger(v)?String(v):v.toFixed(4);}
document.querySelectorAll('svg.chart').forEach(function(svg){
  const series=JSON.parse(svg.dataset.series), box=JSON.parse(svg.dataset.box);
  const mark=svg.querySelector('.marker');
  function sx(x){return box.left+(x-box.x0)/(box.x1-box.x0)*box.width;}
  function sy(y){return box.top+box.height-(y-box.y0)/(box.y1-box.y0)*box.height;}
  svg.addEventListener('mousemove',function(e){
    const p=new DOMPoint(e.clientX,e.clientY).matrixTransform(svg.getScreenCTM().inverse());
    let best=null;
    series.forEach(function(s){s.x.forEach(function(x,i){
      const y=s.y[i]; if(x===null||y===null)return;
      const d=(sx(x)-p.x)**2+(sy(y)-p.y)**2;
      if(best===null||d<best.d)best={d:d,s:s,i:i};});});
    if(best===null)return;
    const s=best.s,i=best.i;
    tip.textContent=s.name+'\\n'+box.xlabel+' '+fmt(s.x[i])+', '+box.ylabel+' '+fmt(s.y[i])+(s.labels?'\\n'+s.labels[i]:'');
    tip.style.display='block';tip.style.left=(e.clientX+12)+'px';tip.style.top=(e.clientY+12)+'px';
    mark.setAttribute('cx',sx(s.x[i]));mark.setAttribute('cy',sy(s.y[i]));mark.setAttribute('visibility','visible');
  });
  svg.addEventListener('mouseleave',function(){tip.style.display='none';mark.setAttribute('visibility','hidden');});
});
document.querySelectorAll('table.sortable').forEach(function(table){
  const heads=table.querySelectorAll('thead th');
  heads.forEach(function(th,col){th.addEventListener('click',function(){
    const first=th.dataset.first||'ascending';
    const dir=th.getAttribute('aria-sort')===first?(first==='ascending'?'descending':'ascending'):first;
    heads.forEach(function(h){h.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',dir);
    const body=table.tBodies[0], rows=Array.from(body.rows), sign=dir==='ascending'?1:-1;
    rows.sort(function(a,b){
      const x=a.cells[col].dataset.v, y=b.cells[col].dataset.v;
      if(x===undefined||x==='')return 1; if(y===undefined||y==='')return -1;
      const nx=Number(x),ny=Number(y);
      return sign*(isNaN(nx)||isNaN(ny)?x.localeCompare(y):nx-ny);});
    rows.forEach(function(r){body.appendChild(r);});
  });});
});
})();
"""


def esc(text: object) -> str:
    """`text` as HTML text or a quoted attribute value."""
    return html.escape(str(text), quote=True)


def number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def write_page(path: Path, title: str, body: str) -> Path:
    """Write one self-contained page: `body` (HTML, already escaped) inside the skeleton."""
    text = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body>\n{body}\n<div id='tip'></div><script>{SCRIPT}</script></body></html>\n"
    )
    with atomic_write(path) as f:
        f.write(text)
    return path


@dataclass
class Series:
    name: str
    x: Sequence[float]
    y: Sequence[float]
    labels: Sequence[str] | None = None  # one per point, shown on hover (e.g. "threshold 128")


@dataclass
class Axis:
    label: str
    limits: tuple[float, float] | None = None  # None: from the data, widened to round ticks
    ticks: list[float] = field(default_factory=list)


WIDTH, HEIGHT = 380, 280
MARGIN = {"left": 52, "right": 12, "top": 24, "bottom": 40}


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        low, high = (low - 0.5, low + 0.5) if math.isfinite(low) else (0.0, 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [round(first + i * step, 12) for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]


def _limits(axis: Axis, values: list[float]) -> tuple[float, float, list[float]]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if axis.limits is not None:
        low, high = axis.limits
        return low, high, axis.ticks or _nice_ticks(low, high)
    ticks = _nice_ticks(min(finite, default=0.0), max(finite, default=1.0))
    return ticks[0], ticks[-1], ticks


def _clean(values: Sequence[float]) -> list[float | None]:
    """Finite values to 6 significant digits (the page shows 4; a dozen curves of 256 points stay small), others None."""
    return [float(f"{v:.6g}") if v is not None and math.isfinite(v) else None for v in values]


def line_chart(title: str, series: list[Series], x: Axis, y: Axis, markers: bool = False) -> str:
    """An inline SVG line chart with a legend, one line per series, the values on hover."""
    series = [Series(s.name, _clean(s.x), _clean(s.y), s.labels) for s in series]
    x0, x1, xticks = _limits(x, [v for s in series for v in s.x])
    y0, y1, yticks = _limits(y, [v for s in series for v in s.y])
    box = {"left": MARGIN["left"], "top": MARGIN["top"]}
    box["width"] = WIDTH - MARGIN["left"] - MARGIN["right"]
    box["height"] = HEIGHT - MARGIN["top"] - MARGIN["bottom"]

    def sx(v: float) -> float:
        return box["left"] + (v - x0) / ((x1 - x0) or 1) * box["width"]

    def sy(v: float) -> float:
        return box["top"] + box["height"] - (v - y0) / ((y1 - y0) or 1) * box["height"]

    parts = [f"<text x='{WIDTH / 2}' y='15' text-anchor='middle' font-weight='bold'>{esc(title)}</text>"]
    bottom, right = box["top"] + box["height"], box["left"] + box["width"]
    for t in xticks:
        parts.append(
            f"<line x1='{sx(t):.1f}' x2='{sx(t):.1f}' y1='{box['top']}' y2='{bottom}' stroke='#eee'/>"
            f"<text x='{sx(t):.1f}' y='{bottom + 14}' text-anchor='middle'>{t:g}</text>"
        )
    for t in yticks:
        parts.append(
            f"<line x1='{box['left']}' x2='{right}' y1='{sy(t):.1f}' y2='{sy(t):.1f}' stroke='#eee'/>"
            f"<text x='{box['left'] - 4}' y='{sy(t) + 4:.1f}' text-anchor='end'>{t:g}</text>"
        )
    parts.append(
        f"<rect x='{box['left']}' y='{box['top']}' width='{box['width']}' height='{box['height']}' "
        "fill='none' stroke='#999'/>"
        f"<text x='{box['left'] + box['width'] / 2}' y='{HEIGHT - 6}' text-anchor='middle'>{esc(x.label)}</text>"
        f"<text transform='translate(12 {box['top'] + box['height'] / 2}) rotate(-90)' text-anchor='middle'>"
        f"{esc(y.label)}</text>"
    )
    legend = []
    for i, s in enumerate(series):
        colour, dash = COLOURS[i % len(COLOURS)], DASHES[(i // len(COLOURS)) % len(DASHES)]
        points = [(sx(a), sy(b)) for a, b in zip(s.x, s.y, strict=True) if a is not None and b is not None]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
        parts.append(
            f"<polyline class='series' data-name='{esc(s.name)}' points='{path}' fill='none' stroke='{colour}' "
            f"stroke-width='1.6'" + (f" stroke-dasharray='{dash}'" if dash else "") + "/>"
        )
        if markers:
            parts += [f"<circle cx='{a:.1f}' cy='{b:.1f}' r='2.5' fill='{colour}'/>" for a, b in points]
        legend.append(f"<span><i style='background:{colour}'></i>{esc(s.name)}</span>")
    parts.append("<circle class='marker' r='4' fill='none' stroke='#000' visibility='hidden'/>")
    data = [{"name": s.name, "x": s.x, "y": s.y, **({"labels": list(s.labels)} if s.labels else {})} for s in series]
    box.update(
        x0=x0, x1=x1 if x1 != x0 else x0 + 1, y0=y0, y1=y1 if y1 != y0 else y0 + 1, xlabel=x.label, ylabel=y.label
    )
    return (
        f"<figure><svg class='chart' xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}' data-series='{esc(json.dumps(data))}' data-box='{esc(json.dumps(box))}' "
        f"role='img' aria-label='{esc(title)}'>{''.join(parts)}</svg>"
        f"<figcaption class='legend'>{''.join(legend)}</figcaption></figure>"
    )


def curve_charts(title: str, by_name: dict[str, dict[str, list]]) -> str:
    """The PR curve and the F-measure against the threshold of {name: SODMetrics.curves()}, side by side;
    a curve that was not computed (the F family not chosen) is left out."""
    pr, fm = [], []
    for name, curve in by_name.items():
        if {"threshold", "precision", "recall"} <= curve.keys():
            labels = [f"threshold {t}" for t in curve["threshold"]]
            pr.append(Series(name, curve["recall"], curve["precision"], labels))
        if {"threshold", "F"} <= curve.keys():
            fm.append(Series(name, curve["threshold"], curve["F"]))
    unit = (0.0, 1.0)
    charts = []
    if pr:
        charts.append(line_chart(f"{title}: precision-recall", pr, Axis("recall", unit), Axis("precision", unit)))
    if fm:
        thresholds = Axis("threshold", (0.0, 255.0), [0, 51, 102, 153, 204, 255])
        charts.append(line_chart(f"{title}: F-measure", fm, thresholds, Axis("F", unit)))
    return f"<div class='charts'>{''.join(charts)}</div>" if charts else ""


def definitions(items: dict) -> str:
    """A dict as a definition list; nested values as compact JSON."""
    rows = []
    for key, value in items.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        rows.append(f"<dt>{esc(key)}</dt><dd>{esc(text)}</dd>")
    return f"<dl class='card'>{''.join(rows)}</dl>"
