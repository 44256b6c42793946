"""runs/NAME/plots/ after a real run, and `python -m salnet.report` on finished run directories."""

import html
import io
import json
import re
import shutil
import statistics

import numpy as np
import pytest
from PIL import Image
from test_train import tiny_config

from salnet.config import load_config, save_config
from salnet.data import ValStream
from salnet.report import main as report_main
from salnet.report import training_time
from salnet.run import plots
from salnet.run.rundir import MetricsFile, read_records
from salnet.run.runlog import format_duration
from salnet.shards.synth import synthesize
from salnet.validate import panel_rank

from conftest import forked_run, run_py

FIGURES = {
    "loss.png": (600, 400),
    "lr.png": (600, 300),
    "val_metrics.png": (1200, 840),
    "pr_A.png": (750, 630),
    "fm_A.png": (750, 630),
    "pr_B.png": (750, 630),
    "fm_B.png": (750, 630),
}
# The colour of each figure's first line: matplotlib's first (tab:blue); salnet.metrics.curve_plots starts with tab:red.
FIRST_LINE = {name: (0xD6, 0x27, 0x28) if name.startswith(("pr_", "fm_")) else (0x1F, 0x77, 0xB4) for name in FIGURES}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run with two val sets (the second's masks smaller than eval_size), W&B off."""
    tmp = tmp_path_factory.mktemp("run")
    train, a = synthesize(tmp / "demo", train=64, val=20, size=64, seed=3)
    _, b = synthesize(tmp / "other", train=1, val=13, size=48, seed=9)
    path, run_dir = tiny_config(
        tmp,
        {"train": train, "val": a},
        data={"val": {"A": [str(a)], "B": [str(b)]}},
        train={"steps": 4},
        eval={"every": 2},
        checkpoint={"every": 4},
        log={"every": 1, "plots": True, "panel_images": 3, "worst_images": 2},
    )
    forked_run(["-m", "salnet.train", "--config", path], timeout=400)
    return run_dir


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def coloured_pixels(picture, colour, tolerance=10):
    return int((np.abs(picture.astype(int) - colour).max(axis=2) <= tolerance).sum())


@pytest.mark.slow
def test_plots_after_a_run_show_what_they_claim(finished_run):
    out = finished_run / "plots"
    records = read_records(finished_run / "metrics.jsonl")
    cfg = load_config(str(finished_run / "config.yaml"))
    assert {p.name for p in out.iterdir()} == set(FIGURES) | {
        "panel_A.png",
        "panel_B.png",
        "worst_A.png",
        "worst_B.png",
        "latest.npz",
    }
    for name, size in FIGURES.items():
        picture = Image.open(out / name)
        assert picture.size == size, name
        assert coloured_pixels(png(out / name), FIRST_LINE[name]) > 100, f"{name} has no line drawn"

    # The figures hold the records: every loss component, the lr, each metric of each set.
    trains = [r for r in records if r["kind"] == "train"]
    vals = [r for r in records if r["kind"] == "val"]
    lines = {line.get_label(): line for line in plots.loss_figure(records).axes[0].lines}
    assert set(lines) == {k for k in trains[0] if k not in plots.TRAIN_STATS | {"kind", "step"}} and "loss" in lines
    for name, line in lines.items():
        assert list(line.get_xdata()) == [1, 2, 3, 4] and list(line.get_ydata()) == [r[name] for r in trains]
    assert list(plots.lr_figure(records).axes[0].lines[0].get_ydata()) == [r["lr"] for r in trains]
    axes = plots.val_metrics_figure(records).axes
    assert [ax.get_title() for ax in axes] == ["maxF", "meanF", "adpF", "maxE", "meanE", "adpE", "S", "MAE"]
    for ax in axes:
        assert [line.get_label() for line in ax.lines] == ["A", "B", "mean"]
        for line in ax.lines:
            assert list(line.get_xdata()) == [2, 4]
            assert list(line.get_ydata()) == [r[f"{line.get_label()}/{ax.get_title()}"] for r in vals]

    # The panels: one row per image (image | ground truth | prediction), at the masks' sizes (64, 48 px).
    for name, side, rows in (("panel_A", 64, 3), ("panel_B", 48, 3), ("worst_A", 64, 2), ("worst_B", 48, 2)):
        assert png(out / f"{name}.png").shape == (rows * side + (rows - 1) * 4, 3 * side + 8, 3), name
    step, details = plots.load_latest(out / plots.LATEST)
    assert step == 4
    for name, d in details.items():
        keys = [
            k
            for batch in ValStream(cfg.data.model_copy(update={"val": cfg.data.val_sets[name]}), 0, 1)
            for k in batch["key"]
        ]
        assert [s.key for s in d.panel] == sorted(keys, key=lambda k: (panel_rank(k), k))[:3]
        assert sorted(d.per_image) == sorted(keys)
        maes = {k: m["MAE"] for k, m in d.per_image.items()}
        assert [s.key for s in d.worst] == sorted(maes, key=maes.get, reverse=True)[:2]
        # the newest validation's numbers: per-image MAE averages to the logged MAE, the F curve peaks at maxF
        assert np.mean(list(maes.values())) == pytest.approx(vals[-1][f"{name}/MAE"], abs=1e-12)
        assert max(d.curves["F"]) == pytest.approx(vals[-1][f"{name}/maxF"], abs=1e-12)
        assert np.array_equal(png(out / f"panel_{name}.png"), plots.panel_grid(d.panel))


@pytest.mark.slow
def test_report_redraws_and_summarises_a_finished_run(finished_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    before = {p.name: png(p) for p in (run_dir / "plots").glob("*.png")}
    for p in (run_dir / "plots").glob("*.png"):
        p.unlink()
    out = run_py(["-m", "salnet.report", run_dir], timeout=200).stdout
    after = {p.name: png(p) for p in (run_dir / "plots").glob("*.png")}
    assert set(after) == set(before) and f"drew {len(before)} files" in out
    for name, picture in after.items():
        assert picture.shape == before[name].shape, name
        if name.startswith(("panel", "worst")):
            assert np.array_equal(picture, before[name]), name

    records = read_records(run_dir / "metrics.jsonl")
    trains = [r for r in records if r["kind"] == "train"]
    vals = [r for r in records if r["kind"] == "val"]
    assert "steps       4 of 4 (complete)" in out
    assert f"time        {format_duration(trains[-1]['elapsed_s'])} training over 1 attempt(s)" in out
    assert f"throughput  {statistics.median(r['images_per_s'] for r in trains):.1f} img/s" in out
    assert f"checkpoint  {run_dir / 'checkpoints' / 'step-00000004'}" in out
    best = max(vals, key=lambda r: r["mean/maxF"])
    assert f"best.pt     {run_dir / 'best.pt'}: mean/maxF={best['mean/maxF']:.4f} @ step {best['step']}" in out
    table = out[out.index("best validation of each set (by maxF):") :].splitlines()
    assert table[1].split() == ["set", "step", "maxF", "meanF", "adpF", "maxE", "meanE", "adpE", "S", "MAE"]
    for row, set_name in zip(table[2:5], ("A", "B", "mean")):
        chosen = max(vals, key=lambda r: r[f"{set_name}/maxF"])
        assert row.split()[:4] == [
            set_name,
            str(chosen["step"]),
            f"{chosen[f'{set_name}/maxF']:.4f}",
            f"{chosen[f'{set_name}/meanF']:.4f}",
        ]
    assert "validation @ step 4" in out


def test_report_on_a_run_that_never_validated(tmp_path):
    run_dir = tmp_path / "young"
    run_dir.mkdir()
    log = MetricsFile(run_dir)  # what a run writes before its first validation
    for step, loss in ((1, 0.9), (2, 0.7), (3, 0.6)):
        log.append(
            {
                "kind": "train",
                "step": step,
                "epoch": 0,
                "lr": 0.01 * step,
                "loss": loss,
                "images_per_s": 100.0 + step,
                "data_wait": 0.1,
                "peak_mem_mib": 500,
                "elapsed_s": 2.0 * step,
                "eta_s": 10.0,
            }
        )
    out = run_py(["-m", "salnet.report", run_dir], timeout=200).stdout
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["loss.png", "lr.png"]
    assert "steps       3, epoch 0" in out and "time        0:00:06 training over 1 attempt(s)" in out
    assert "throughput  102.0 img/s" in out and "no validation yet" in out and "checkpoint  none" in out


def test_training_time_adds_up_attempts():
    # A resumed attempt starts its clock again: 30 s, then 20 s more.
    records = [{"kind": "train", "step": s, "elapsed_s": e} for s, e in ((1, 10.0), (2, 30.0), (2, 5.0), (3, 20.0))]
    assert training_time(records) == (50.0, 2)
    assert training_time([{"kind": "val", "step": 1}]) == (0.0, 0)


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    proc = run_py(["-m", "salnet.report", tmp_path], check=False, timeout=100)
    assert proc.returncode == 2 and "metrics.jsonl nor" in proc.stderr and "not a salnet run directory" in proc.stderr


def damaged_run(root, plots_as_file=False):
    """A run directory as a hostile pass finds it: a corrupt line in the middle of metrics.jsonl, rows
    that are not records, a torn last line, a truncated plots/latest.npz (or a file where plots/ is)."""
    run_dir = root / "damaged"
    run_dir.mkdir()
    save_config(load_config(None, ["train.steps=4"]), run_dir / "config.yaml")
    good = [
        {"kind": "train", "step": 1, "lr": 0.1, "loss": 0.9, "images_per_s": 50.0, "data_wait": 0.1, "elapsed_s": 2.0},
        {"kind": "val", "step": 2, "val/maxF": 0.61, "val/MAE": 0.2},
        {"kind": "train", "step": 3, "lr": 0.1, "loss": 0.5, "images_per_s": 70.0, "data_wait": 0.1, "elapsed_s": 6.0},
    ]
    lines = [
        json.dumps(good[0]),
        '{"kind": "train", "step": 2, "loss": 0.8',  # line 2: cut in the middle of the file
        "[1, 2]",  # line 3: not an object
        json.dumps({"kind": "train", "loss": 0.7}),  # line 4: no step
        json.dumps(good[1]),
        json.dumps({"kind": "train", "step": 3, "loss": "high"}),  # line 6: not a number
        json.dumps(good[2]),
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "tra')  # and a torn last line
    if plots_as_file:
        (run_dir / "plots").write_text("not a directory")
    else:
        (run_dir / "plots").mkdir()
        buffer = io.BytesIO()
        np.savez_compressed(buffer, meta=np.array("{}"), x=np.zeros(1000))
        (run_dir / "plots" / "latest.npz").write_bytes(buffer.getvalue()[:200])
    return run_dir, good


def report(run_dir, capsys, *args):
    with pytest.raises(SystemExit) as e:
        report_main([str(run_dir), *args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_report_on_a_damaged_run_summarises_what_it_can_and_names_each_problem(tmp_path, capsys):
    run_dir, good = damaged_run(tmp_path)
    code, out, err = report(run_dir, capsys)
    log = run_dir / "metrics.jsonl"
    assert code == 1 and "Traceback" not in err
    assert err.splitlines() == [
        f"python -m salnet.report: {run_dir / 'plots' / 'latest.npz'}: unreadable (BadZipFile: File is not a zip "
        f"file); curves and pictures of the latest validation not drawn",
        f"python -m salnet.report: {log}, line 2: not a JSON record (Expecting ',' delimiter), left out",
        f"python -m salnet.report: {log}, line 3: not a record but a JSON list, left out",
        f'python -m salnet.report: {log}, line 4: no step (a whole number >= 0): {{"kind": "train", "loss": 0.7}}, left out',
        f"python -m salnet.report: {log}, line 6: 'loss' not a number, left out",
    ]
    # The summary holds the readable rows, no more and no less.
    assert "steps       3 of 4" in out and "time        0:00:06 training over 1 attempt(s)" in out
    assert "throughput  60.0 img/s (median of 2 train lines" in out
    assert "best.pt     missing: val/maxF=0.6100 @ step 2" in out and "validation @ step 2" in out
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == [
        "latest.npz",
        "loss.png",
        "lr.png",
        "val_metrics.png",
    ]


def test_report_on_a_file_where_plots_should_be_and_on_a_run_with_only_its_config(tmp_path, capsys):
    run_dir, _ = damaged_run(tmp_path, plots_as_file=True)
    code, out, err = report(run_dir, capsys)
    assert code == 1 and "Traceback" not in err and "plots: drew 0 files" in out
    assert f"{run_dir / 'plots'}: a file where the plots directory should be; nothing drawn" in err.splitlines()[0]
    assert (run_dir / "plots").read_text() == "not a directory"  # left as it was

    (run_dir / "metrics.jsonl").unlink()  # a run that has written only its config
    code, out, err = report(run_dir, capsys, "--no-plots")
    assert (code, err) == (0, "")
    assert "steps       0 of 4" in out and "no validation yet" in out and "nothing logged yet" in out


def chart_series(text: str, title: str) -> list[dict]:
    """The series a chart of the page draws (its data-series, what the lines are drawn from)."""
    svg = re.search(rf"<svg class='chart'[^>]* data-series='([^']*)'[^>]* aria-label='{re.escape(title)}'", text)
    assert svg, f"no chart {title!r}"
    return json.loads(html.unescape(svg.group(1)))


@pytest.mark.slow
def test_report_html_shows_the_history_curves_and_panels_of_a_finished_run(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    code, out, err = report(run_dir, capsys, "--no-plots", "--html")
    page = run_dir / "report" / "index.html"
    assert (code, err) == (0, "") and out.splitlines()[-1] == f"page: {page}"
    text = page.read_text()
    records = read_records(run_dir / "metrics.jsonl")
    vals = [r for r in records if r["kind"] == "val"]
    for metric in ("maxF", "meanF", "adpF", "maxE", "meanE", "adpE", "S", "MAE"):
        drawn = chart_series(text, metric)
        assert [s["name"] for s in drawn] == ["A", "B", "mean"], metric
        for s in drawn:
            expected = [r[f"{s['name']}/{metric}"] for r in vals]
            assert s["x"] == [2, 4] and s["y"] == pytest.approx(expected, rel=1e-5), (metric, s["name"])
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert chart_series(text, "training loss")[0]["y"] == pytest.approx(losses, rel=1e-5)  # 6 digits drawn
    assert "best validation of each set (by maxF)" in text  # the summary, best included

    step, details = plots.load_latest(run_dir / "plots" / plots.LATEST)
    assert f"Latest validation (step {step})" in text
    for index, (name, d) in enumerate(details.items()):
        (curve,) = chart_series(text, f"{name}: precision-recall")
        assert curve["x"] == pytest.approx(d.curves["recall"], rel=1e-5, abs=1e-9)
        assert curve["y"] == pytest.approx(d.curves["precision"], rel=1e-5, abs=1e-9)
        for group in ("panel", "worst"):
            samples = getattr(d, group)
            assert samples
            for i, s in enumerate(samples):  # the pictures the run kept, pixel for pixel
                for part in ("image", "gt", "pred"):
                    path = run_dir / "report" / "pictures" / str(index) / group / f"{i:03d}-{part}.png"
                    assert np.array_equal(np.asarray(Image.open(path)), getattr(s, part)), path
                    assert f"src='pictures/{index}/{group}/thumbs/{i:03d}-{part}.png'" in text
