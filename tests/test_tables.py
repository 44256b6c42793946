"""Method and dataset names with markup characters in salnet.evaluate's tables and plots: each shows
as itself (escaped in Markdown, LaTeX and matplotlib labels), and nothing breaks the table."""

import io
import xml.etree.ElementTree as ET

from markdown_it import MarkdownIt
from matplotlib.cbook import is_math_text

from salnet.evaluation import tables
from salnet.metrics import curve_plots
from salnet.run import plots

NAMES = ["a|b", "$x$", "cost 5$", "_ours", "**bold** [l](u) <i>", "back\\slash", "two\nlines"]
METRICS = ["maxF", "MAE"]


def results():
    scores = {name: {"maxF": 0.5 + i / 100, "MAE": 0.1, "images": 3} for i, name in enumerate(NAMES)}
    return {"DS|$1": scores}


def shown(name):
    return name.replace("\n", " ")


def test_markdown_shows_every_name_as_itself_in_its_own_row():
    html = MarkdownIt("gfm-like", {"linkify": False}).render(tables.markdown(results(), METRICS))
    tree = ET.fromstring(f"<root>{html}</root>")
    assert "".join(tree.find("h3").itertext()) == "DS|$1"
    rows = tree.findall("./table/tbody/tr")
    assert ["".join(row[0].itertext()) for row in rows] == [shown(n) for n in NAMES]
    assert all(len(row) == len(METRICS) + 2 for row in rows)  # no name added a column


def test_latex_keeps_one_row_per_method():
    tex = tables.latex(results(), METRICS)
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == len(NAMES) and all(line.endswith(r"\\") for line in body)
    assert body[1].startswith(r"\$x\$ & ") and body[2].startswith(r"cost 5\$ & ")


def test_plot_labels_draw_and_show_every_method():
    curve = {"precision": [1.0, 0.5], "recall": [0.0, 1.0], "F": [0.4, 0.6], "threshold": [255, 0]}
    figures = curve_plots.figures({"DS $1": {name: curve for name in NAMES}})
    assert sorted(figures) == ["fm_DS $1", "pr_DS $1"]
    for fig in figures.values():
        fig.savefig(io.BytesIO(), format="png")
        (ax,) = fig.axes
        texts = [ax.get_title(), *(t.get_text() for t in ax.get_legend().get_texts())]
        assert not any(is_math_text(t) for t in texts), texts  # '$x$' drawn as typed, not typeset as x
        shown = [t.replace("\\$", "$").removeprefix(" ") for t in texts]
        assert shown == ["DS $1", *NAMES]  # '_ours' too: matplotlib leaves '_'-labels out of legends


def test_val_set_names_draw_as_themselves_in_training_plots():
    records = [{"kind": "val", "step": s, **{f"{n}/maxF": 0.5 + s / 10 for n in NAMES}} for s in (1, 2)]
    fig = plots.val_metrics_figure(records)
    fig.savefig(io.BytesIO(), format="png")
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert not any(is_math_text(t) for t in texts), texts
    assert [t.replace("\\$", "$").removeprefix(" ") for t in texts] == NAMES
