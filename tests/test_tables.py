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


def with_uncertainty():
    """results() with intervals, and p-values that make the second-best maxF (and every MAE, all tied) not
    significantly different from the best and the others significant."""
    out = results()
    by_method = out["DS|$1"]
    best = max(by_method, key=lambda m: by_method[m]["maxF"])
    second = sorted(by_method, key=lambda m: by_method[m]["maxF"])[-2]
    for name, scores in by_method.items():
        scores["ci95"] = {"maxF": [scores["maxF"] - 0.01, scores["maxF"] + 0.02], "MAE": [0.05, 0.15]}
        scores["p"] = {
            "maxF": {other: 0.5 if {name, other} == {best, second} else 0.001 for other in by_method if other != name},
            "MAE": {other: 1.0 for other in by_method if other != name},
        }
    return out, best, second


def test_intervals_and_daggers_show_in_every_format_without_breaking_a_table():
    res, best, second = with_uncertainty()
    best_f, second_f = res["DS|$1"][best]["maxF"], res["DS|$1"][second]["maxF"]
    html = MarkdownIt("gfm-like", {"linkify": False}).render(tables.markdown(res, METRICS))
    tree = ET.fromstring(f"<root>{html}</root>")
    rows = tree.findall("./table/tbody/tr")
    assert ["".join(row[0].itertext()) for row in rows] == [shown(n) for n in NAMES]
    assert all(len(row) == len(METRICS) + 2 for row in rows)
    cells = {"".join(row[0].itertext()): ["".join(c.itertext()) for c in row[1:]] for row in rows}
    assert cells[shown(best)][0] == f"{best_f:.4f} [{best_f - 0.01:.4f}, {best_f + 0.02:.4f}]"
    assert cells[shown(second)][0] == f"{second_f:.4f}{tables.DAGGER} [{second_f - 0.01:.4f}, {second_f + 0.02:.4f}]"
    assert sum(tables.DAGGER in c[0] for c in cells.values()) == 1  # only the one not significantly worse
    assert all(c[1] == "0.1000 [0.0500, 0.1500]" for c in cells.values())  # tied best: bold, no dagger
    assert tables.LEGEND in "".join(tree.itertext())

    console = tables.console(res, METRICS).splitlines()
    best_row = next(i for i, line in enumerate(console) if f"{best_f:.4f}*" in line)
    assert console[-1] == tables.LEGEND
    assert console[best_row + 1].split() == [f"[{best_f - 0.01:.4f},", f"{best_f + 0.02:.4f}]", "[0.0500,", "0.1500]"]
    assert sum(line.lstrip().startswith("[") for line in console) == len(NAMES)  # a line of intervals per method

    tex = tables.latex(res, METRICS)
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == len(NAMES) and rf"{second_f:.3f}$^\dagger$\,{{\scriptsize[" in tex
    assert r"$^\dagger$ not significantly different" in tex.split(r"\bottomrule")[1]

    header = tables.csv_text(res, METRICS).splitlines()[0]
    assert header == "dataset,method,maxF,maxF_lo,maxF_hi,MAE,MAE_lo,MAE_hi,images"
    plain = tables.csv_text(results(), METRICS).splitlines()[0]
    assert plain == "dataset,method,maxF,MAE,images" and tables.DAGGER not in tables.markdown(results(), METRICS)
