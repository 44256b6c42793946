"""PR curves and F-measure-vs-threshold curves, one figure per dataset, one line per method.

`curves` is {dataset: {method: SODMetrics.curves()}}: 256 points per curve, point i at threshold
255 - i. Figures are matplotlib `Figure`s drawn by the Agg canvas (no pyplot, no display, no
global state), so they can be inspected before they are saved.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Curves = dict[str, dict[str, dict[str, list]]]
COLOURS = (
    "tab:red",
    "tab:blue",
    "tab:green",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)
LINESTYLES = ("-", "--", "-.", ":")
FORMATS = ("png", "pdf", "svg")


def _styles():
    """Colour first, then line style: eleven methods and more stay distinguishable."""
    for linestyle, colour in itertools.product(LINESTYLES, COLOURS):
        yield {"color": colour, "linestyle": linestyle}


def plot_label(text: str) -> str:
    """`text` drawn as itself by matplotlib: '$' escaped (a pair would be typeset as math, a lone one
    fails to draw), and a leading '_' kept off the front (matplotlib leaves such labels out of the legend)."""
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(5, 4.2), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _curve_figure(
    dataset: str, by_method: dict[str, dict[str, list]], x: str, y: str, labels: tuple[str, str], xlim, legend: str
) -> Figure:
    """One line per method: curve[y] against curve[x]."""
    fig, ax = _figure()
    for (method, curve), style in zip(by_method.items(), _styles(), strict=False):
        ax.plot(curve[x], curve[y], label=plot_label(method), linewidth=1.5, **style)
    ax.set(title=plot_label(dataset), xlabel=labels[0], ylabel=labels[1], xlim=xlim)
    ax.set_ylim(top=1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize="small")
    return fig


def pr_figure(dataset: str, by_method: dict[str, dict[str, list]]) -> Figure:
    """Mean precision against mean recall over the 256 thresholds."""
    return _curve_figure(dataset, by_method, "recall", "precision", ("Recall", "Precision"), (0, 1), "lower left")


def fm_figure(dataset: str, by_method: dict[str, dict[str, list]]) -> Figure:
    """Mean F-measure (beta^2 = 0.3) against the 8-bit binarisation threshold."""
    return _curve_figure(dataset, by_method, "threshold", "F", ("Threshold", "F-measure"), (0, 255), "lower center")


def figures(curves: Curves) -> dict[str, Figure]:
    """{'pr_DATASET': PR figure, 'fm_DATASET': F-measure figure} for every dataset with F curves."""
    out = {}
    for dataset, by_method in curves.items():
        with_f = {method: curve for method, curve in by_method.items() if "F" in curve}
        if with_f:
            out[f"pr_{dataset}"] = pr_figure(dataset, with_f)
            out[f"fm_{dataset}"] = fm_figure(dataset, with_f)
    return out


def save(curves: Curves, out_dir: Path, fmt: str = "png") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(curves).items():
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, format=fmt)
        paths.append(path)
    return paths
