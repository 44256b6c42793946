"""The metrics card on every result, `salnet.evaluate --merge` (cards must agree) and `--wandb` (offline).

The documents merged here are results.json of format salnet-results/2 built from real SODMetrics
scores and curves of small random maps (what evaluate writes, without running the command)."""

import csv
import json
import re
import socket
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from salnet.evaluation import card, merge, tables, wandb_log
from salnet.evaluation.common import EvaluationError
from salnet.metrics import DEFAULT_FAMILIES, FAMILIES, SODMetrics, metric_names
from salnet.metrics import bootstrap as uncertainty
from salnet.run.wandb_run import transaction_log_records

from conftest import run_py

BOOTSTRAP = {"resamples": 200, "seed": 0, "level": 0.95, "interval": "percentile", "test": uncertainty.TEST}


def scored(seed: int, images: int = 4, families=DEFAULT_FAMILIES) -> SODMetrics:
    """Real SODMetrics sums and per-image rows of `images` random 24x32 maps against random masks."""
    generator = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(24, 32, generator=generator) > 0.6).float() for _ in range(images)]
    preds = [(m * 0.3 + 0.7 * torch.rand(24, 32, generator=generator)).clamp(0, 1) for m in masks]
    metrics = SODMetrics(list(families), per_image=True)
    metrics.update(preds, masks, keys=[f"img{i}" for i in range(images)])
    return metrics


def write_input(
    folder, methods: dict, families=DEFAULT_FAMILIES, card_changes=None, per_image=True, images=4, kinds=(True, False)
):
    """What `evaluate --out folder` writes: results.json (with intervals and p-values), curves.json
    and per_image/; methods: {(dataset, method): seed of its maps}."""
    document = {
        "format": merge.FORMAT,
        "made": {"command": f"python -m salnet.evaluate --out {folder}", "salnet": "0.1.0", "date": "2026-12-08"},
        "card": {
            **card.metrics_card(families, maps_read=card.maps_read_text(*kinds), bootstrap=BOOTSTRAP),
            **(card_changes or {}),
        },
        "bootstrap": BOOTSTRAP,
        "results": {},
    }
    curves, rows = {}, {}
    for (dataset, method), seed in methods.items():
        metrics = scored(seed, images, families)
        document["results"].setdefault(dataset, {})[method] = {**metrics.compute(), "images": metrics.num_images}
        curves.setdefault(dataset, {})[method] = metrics.curves()
        rows.setdefault(dataset, {})[method] = metrics.per_image()
    for dataset, by_method in rows.items():
        found = uncertainty.bootstrap(by_method, BOOTSTRAP["resamples"], BOOTSTRAP["seed"])
        for method, per_image_rows in by_method.items():
            scores = document["results"][dataset][method]
            scores["ci95"] = {name: list(bounds) for name, bounds in found.intervals[method].items()}
            scores["p"] = found.p_values[method]
            if per_image:
                path = folder / "per_image" / dataset / f"{method}.npz"
                path.parent.mkdir(parents=True, exist_ok=True)
                per_image_rows.save(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(document))
    (folder / "curves.json").write_text(json.dumps(curves))
    return folder / "results.json"


def write_like_evaluate(document, curves, out):
    """The writer evaluate hands to merge_main: here results.json, curves.json and the Markdown table."""
    (out / "results.json").write_text(json.dumps(document))
    (out / "curves.json").write_text(json.dumps(curves))
    metrics = metric_names(document["card"]["families"])
    (out / "results.md").write_text(card.markdown(document["card"]) + tables.markdown(document["results"], metrics))


# --------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------

GENERAL_KEYS = {
    "card",
    "matches",
    "families",
    "averaging",
    "quantisation",
    "normalisation",
    "gt_binarisation",
    "thresholds",
    "adaptive_threshold",
    "maps_read",
    "bootstrap",
}
DEFAULT_FAMILY_KEYS = {
    "F",
    "F.beta2",
    "F.max",
    "F.mean",
    "F.adaptive",
    "E",
    "E.thresholds",
    "S",
    "S.alpha",
    "wF",
    "wF.beta",
    "MAE",
}


def test_card_states_every_definition_of_the_chosen_families():
    default = card.metrics_card(DEFAULT_FAMILIES, maps_read=card.maps_read_text(True, False), bootstrap=BOOTSTRAP)
    assert set(default) == GENERAL_KEYS | DEFAULT_FAMILY_KEYS
    assert default["F.beta2"] == 0.3 and default["S.alpha"] == 0.5 and default["wF.beta"] == 1
    assert default["matches"] == "PySODMetrics 1.6.2" and default["families"] == list(DEFAULT_FAMILIES)
    assert "256 thresholds" in default["thresholds"] and "i/255" in default["thresholds"]
    assert "not the mean of per-image maxima" in default["F.max"] and "> 128" in default["gt_binarisation"]
    assert "Fan et al., IJCAI 2018" in default["E"] and default["maps_read"] == {"folders": card.MAPS_READ_FOLDERS}
    assert default["bootstrap"] == BOOTSTRAP
    # Opt-in families add their own definitions; every family has some.
    every = card.metrics_card(FAMILIES, maps_read=card.maps_read_text(True, True), bootstrap=None)
    assert set(every) - set(default) == {"IoU", "Dice", "BER", "MSIoU", "SI-MAE", "SI-F", "HCE"}
    assert list(every["maps_read"]) == ["checkpoints", "folders"] and every["bootstrap"] is None
    assert "bilinear cv2.resize" in card.MAPS_READ_FOLDERS and "align_corners=False" in card.MAPS_READ_CHECKPOINTS
    only_f = card.metrics_card(["F"], maps_read="x", bootstrap=None)
    assert {k for k in only_f if card.family_of(k)} == {"F", "F.beta2", "F.max", "F.mean", "F.adaptive"}
    with pytest.raises(ValueError, match="'Fx'"):
        card.metrics_card(["Fx"], maps_read="x", bootstrap=None)


def test_card_renderings_state_every_key_and_leave_the_tables_readable():
    every = card.metrics_card(FAMILIES, maps_read=card.maps_read_text(True, True), bootstrap=BOOTSTRAP)
    items = card.html_items(every)
    assert list(items) == list(every) and items["bootstrap"].startswith("resamples: 200; seed: 0; level: 0.95")
    md = card.markdown(every)
    assert all(f"| {tables.md_escape(key)} |" in md for key in every)
    tex = card.latex_comment(every)
    assert all(line.startswith("% ") for line in tex.splitlines()) and len(tex.splitlines()) == len(every)
    # Above a CSV table: csv reads the table once the '#' lines are skipped.
    table = tables.csv_text({"D": {"a#b": {"maxF": 0.5, "images": 3}}}, ["maxF"])
    lines = (card.csv_comment(every) + table).splitlines()
    rows = list(csv.reader(line for line in lines if not line.startswith("#")))
    assert rows == [["dataset", "method", "maxF", "images"], ["D", "a#b", "0.5", "3"]]
    assert sum(line.startswith("# ") for line in lines) == len(every)


# --------------------------------------------------------------------------------------------
# --merge
# --------------------------------------------------------------------------------------------


def test_merge_refuses_different_cards_naming_each_definition(tmp_path):
    a = write_input(tmp_path / "A", {("DS", "one"): 1})
    b = write_input(
        tmp_path / "B",
        {("DS", "two"): 2},
        card_changes={"thresholds": "255 thresholds", "S.alpha": 0.7, "maps_read": "not resized"},
    )
    with pytest.raises(EvaluationError) as raised:
        merge.merge_main([a, b], tmp_path / "C", write_like_evaluate)
    message = str(raised.value)
    assert "differ in 3 definition(s)" in message
    assert f"thresholds: {a}: {card.GENERAL['thresholds']}; {b}: 255 thresholds" in message
    assert f"S.alpha: {a}: 0.5; {b}: 0.7" in message
    assert f"maps_read: {a}: folders: {card.MAPS_READ_FOLDERS}; {b}: not resized" in message
    assert not (tmp_path / "C").exists()
    # Bootstrap settings are definitions too; a family one input did not choose is not a difference.
    c = write_input(tmp_path / "C3", {("DS", "three"): 3}, families=["F", "MAE"], card_changes={"bootstrap": None})
    with pytest.raises(
        EvaluationError, match=r"differ in 1 definition\(s\)[^$]*bootstrap: .*: resamples: 200; seed: 0"
    ):
        merge.merge_documents([a, c])


def test_merge_compares_how_maps_were_read_for_the_kinds_both_inputs_scored(tmp_path):
    """Checkpoints and folders are compared in one evaluate, so an input of each merges; two inputs of
    one kind must have read maps the same way."""
    folders_only = write_input(tmp_path / "A", {("DS", "one"): 1})
    checkpoints_only = write_input(tmp_path / "B", {("DS", "two"): 2}, kinds=(False, True))
    document, _ = merge.merge_documents([folders_only, checkpoints_only])
    assert document["card"]["maps_read"] == card.maps_read_text(True, True)
    both = write_input(tmp_path / "C", {("DS", "three"): 3}, kinds=(True, True))
    other_rule = write_input(
        tmp_path / "D", {("DS", "four"): 4}, card_changes={"maps_read": {"folders": "cropped to the mask"}}
    )
    assert merge.merge_documents([both, checkpoints_only])[0]["card"]["maps_read"] == card.maps_read_text(True, True)
    with pytest.raises(EvaluationError, match=rf"maps_read: {both}: folders: a map .*; {other_rule}: folders: cropped"):
        merge.merge_documents([both, other_rule])


def test_merge_of_agreeing_cards_holds_every_method(tmp_path):
    a = write_input(tmp_path / "A", {("DS", "one"): 1, ("Other", "one"): 5})
    b = write_input(tmp_path / "B", {("DS", "two"): 2, ("DS", "three"): 3})
    c = write_input(tmp_path / "Cin", {("Third", "four"): 4}, families=[*DEFAULT_FAMILIES, "IoU"])
    out = tmp_path / "C"
    document = merge.merge_main([a, b, c], out, write_like_evaluate)
    written = json.loads((out / "results.json").read_text())
    assert written == document and written["format"] == merge.FORMAT
    assert {d: list(by) for d, by in written["results"].items()} == {
        "DS": ["one", "two", "three"],
        "Other": ["one"],
        "Third": ["four"],
    }
    inputs = [json.loads(path.read_text())["results"] for path in (a, b, c)]
    assert written["results"]["Third"]["four"]["maxIoU"] == inputs[2]["Third"]["four"]["maxIoU"]
    assert (
        written["card"]["families"] == [*DEFAULT_FAMILIES, "IoU"]
        and written["card"]["IoU"] == card.FAMILY_DEFINITIONS["IoU"]["IoU"]
    )
    assert [m["path"] for m in written["made"]["merged"]] == [str(a), str(b), str(c)]
    assert written["made"]["command"] == f"python -m salnet.evaluate --merge {a} {b} {c}"
    # Intervals as each input had them; p-values for every pair, those across inputs recomputed.
    merged = written["results"]["DS"]
    for method, scores in merged.items():
        source = inputs[0]["DS"] if method == "one" else inputs[1]["DS"]
        assert scores["ci95"] == source[method]["ci95"]
        assert set(scores["p"]["maxF"]) == set(merged) - {method}
    assert merged["two"]["p"]["maxF"]["three"] == pytest.approx(inputs[1]["DS"]["two"]["p"]["maxF"]["three"])
    assert merged["one"]["p"]["MAE"]["two"] == merged["two"]["p"]["MAE"]["one"]
    assert "p_values" not in written["made"]
    curves = json.loads((out / "curves.json").read_text())
    assert curves["DS"]["two"] == json.loads((tmp_path / "B" / "curves.json").read_text())["DS"]["two"]
    md = (out / "results.md").read_text()
    assert all(f"| {method} |" in md for method in ("one", "two", "three", "four")) and "| thresholds |" in md
    for dataset, method in (("DS", "one"), ("DS", "two"), ("Other", "one"), ("Third", "four")):
        assert (out / "per_image" / dataset / f"{method}.npz").is_file()
    # Without per-image files the pairs across inputs have no p-value, and made says so.
    lone = write_input(tmp_path / "lone", {("DS", "five"): 6}, per_image=False)
    document, _ = merge.merge_documents([a, lone])
    assert document["results"]["DS"]["one"]["p"] == document["results"]["DS"]["five"]["p"] == {}
    assert document["made"]["p_values"].startswith("DS: p-values only between methods of the same input")


def test_merge_keeps_a_method_given_twice_only_when_identical(tmp_path):
    a = write_input(tmp_path / "A", {("DS", "one"): 1})
    same = write_input(tmp_path / "same", {("DS", "one"): 1, ("DS", "two"): 2})
    document, _ = merge.merge_documents([a, same])
    assert list(document["results"]["DS"]) == ["one", "two"]
    other = write_input(tmp_path / "other", {("DS", "one"): 7})
    with pytest.raises(EvaluationError, match=rf"DS/one is in {a} and in {other} with different values"):
        merge.merge_documents([a, other])
    # A dataset scored on other images does not compare: per-image keys, else image counts.
    more = write_input(tmp_path / "more", {("DS", "three"): 3})
    np.savez(more.parent / "per_image" / "DS" / "three.npz", keys=np.array(["img0", "img1", "x"]), MAE=np.ones(3))
    with pytest.raises(EvaluationError, match=r"DS: the inputs scored different images .*in one only: img2, img3, x"):
        merge.merge_documents([a, more])
    fewer = write_input(tmp_path / "fewer", {("DS", "four"): 4}, per_image=False, images=3)
    with pytest.raises(EvaluationError, match=rf"DS: the inputs scored different images \({a}: 4, {fewer}: 3\)"):
        merge.merge_documents([a, fewer])


def test_merge_refuses_what_is_not_a_results_json_of_the_new_format(tmp_path):
    a = write_input(tmp_path / "A", {("DS", "one"): 1})
    old = tmp_path / "old" / "results.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"DS": {"two": {"maxF": 0.8, "images": 3}}}))
    cases = {
        old: "is a results.json of salnet's first format .*without a metrics card.*score it again",
        tmp_path / "nothing.json": "does not exist",
        tmp_path / "text.json": "is not a results.json \\(not JSON",
        tmp_path / "list.json": "is not a results.json: it holds a list",
        tmp_path / "A" / "curves.json": "is a curves.json .*give the results.json beside it",
        tmp_path / "binary.json": "is not a results.json \\(not text: a binary file\\)",
        tmp_path / "later.json": "has format 'salnet-results/9'; this salnet merges salnet-results/2",
        tmp_path / "nocard.json": "has no 'card' dict",
    }
    (tmp_path / "text.json").write_text("maxF,0.8")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "later.json").write_text(json.dumps({"format": "salnet-results/9"}))
    (tmp_path / "nocard.json").write_text(json.dumps({"format": merge.FORMAT, "results": {}}))
    for path, reason in cases.items():
        with pytest.raises(EvaluationError, match=f"'{re.escape(str(path))}' {reason}"):
            merge.merge_documents([a, path])
    (tmp_path / "A" / "curves.json").unlink()
    b = write_input(tmp_path / "B", {("DS", "two"): 2})
    with pytest.raises(EvaluationError, match=f"'{tmp_path / 'A' / 'curves.json'}' does not exist"):
        merge.merge_documents([a, b])


# --------------------------------------------------------------------------------------------
# --wandb, offline
# --------------------------------------------------------------------------------------------


SCORED_CONFIG = {"name": "tiny", "log": {"project": "proj", "entity": None}}


def log_in_a_process(tmp_path, results, pictures, timeout_s=60.0, **env):
    """log_evaluation of results.json (and the curves.json beside it) in a fresh Python, as evaluate
    would call it after writing its files; W&B's folders under tmp_path."""
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from salnet.evaluation.wandb_log import log_evaluation
        folder = Path({str(results.parent)!r})
        print(log_evaluation(
            json.loads((folder / "results.json").read_text()), json.loads((folder / "curves.json").read_text()),
            {pictures!r}, scored_configs=[{SCORED_CONFIG!r}], directory=Path({str(tmp_path / "out")!r}),
            timeout_s={timeout_s!r}))
        """
    )
    env = {
        "WANDB_SILENT": "true",
        **{f"WANDB_{k}_DIR": str(tmp_path / f"wandb-{k.lower()}") for k in ("DATA", "CACHE", "CONFIG")},
        **env,
    }
    return run_py(["-c", script], env=env, timeout=120)


def test_wandb_offline_run_holds_the_table_curves_and_gallery_in_the_scored_runs_group(tmp_path):
    results = write_input(tmp_path / "A", {("DS", "one"): 1, ("DS", "two"): 2})
    document = json.loads(results.read_text())
    for i, scores in enumerate(document["results"]["DS"].values()):
        scores["ci95"] = {"maxF": [0.1 * i, 0.1 * i + 0.05]}
    results.write_text(json.dumps(document))
    # Pictures where the gallery writes them, and its description of them (one picture in two sections).
    gallery = tmp_path / "out" / "gallery" / "DS"
    gallery.mkdir(parents=True)
    for i, name in enumerate(("000-image", "000-gt")):
        Image.fromarray(np.full((8, 12, 3), 40 * (i + 1), np.uint8)).save(gallery / f"{name}.png")
    cells = [{"thumb": "x", "full": "gallery/DS/000-image.png"}, {"thumb": "y", "full": "gallery/DS/000-gt.png"}]
    descriptions = {
        "DS": {
            "columns": ["image", "ground truth", "one"],
            "sections": [
                {"title": "worst images of one", "rows": [{"key": "k0", "cells": [*cells, None]}]},
                {"title": "worst images of two", "rows": [{"key": "k0", "cells": [cells[0], None, None]}]},
            ],
        }
    }
    pictures = [(caption, str(path)) for caption, path in wandb_log.gallery_pictures(descriptions, tmp_path / "out")]
    assert pictures == [
        ("DS | k0 | image (worst images of one)", str(gallery / "000-image.png")),
        ("DS | k0 | ground truth (worst images of one)", str(gallery / "000-gt.png")),
    ]
    secret = "0123456789abcdef0123456789abcdef01234567"
    proc = log_in_a_process(tmp_path, results, pictures, WANDB_MODE="offline", WANDB_API_KEY=secret)
    assert secret not in proc.stdout + proc.stderr
    [run_dir] = (tmp_path / "out" / "wandb").glob("offline-run-*")
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir)
    records = list(transaction_log_records(next(run_dir.glob("run-*.wandb"))))
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "proj" and run.run_group == "tiny" and run.job_type == "evaluate"
    assert list(run.tags) == ["tiny", "evaluate"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["card"]["thresholds"] == card.GENERAL["thresholds"]
    [history] = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    # The results table: a row per method with every metric, as results.json has them.
    table = json.loads((run_dir / "files" / history["results/path"]).read_text())
    metrics = metric_names(DEFAULT_FAMILIES)
    assert table["columns"] == ["dataset", "method", *metrics, "images", "maxF lo", "maxF hi"]
    for row in table["data"]:
        scores = document["results"][row[0]][row[1]]
        assert row[2:-3] == pytest.approx([scores[m] for m in metrics], abs=1e-12)
        assert row[-3:] == [scores["images"], *scores["ci95"]["maxF"]]
    # The curves: 256 points per method, the PR and F-vs-threshold charts read one table.
    curves = json.loads((run_dir / "files" / history["DS/pr_table/path"]).read_text())
    assert curves["columns"] == ["method", "threshold", "precision", "recall", "F"]
    assert [r[0] for r in curves["data"]] == ["one"] * 256 + ["two"] * 256
    assert history["DS/f_threshold_table/path"] == history["DS/pr_table/path"]
    # The gallery: each picture with its caption, pixel for pixel.
    assert history["gallery/captions"] == [caption for caption, _ in pictures]
    for filename, (_, path) in zip(history["gallery/filenames"], pictures, strict=True):
        assert np.array_equal(np.asarray(Image.open(run_dir / "files" / filename)), np.asarray(Image.open(path)))


def test_an_unreachable_wandb_server_costs_a_warning_not_the_evaluation(tmp_path):
    results = write_input(tmp_path / "A", {("DS", "one"): 1})
    secret = "fedcba9876543210fedcba9876543210fedcba98"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = log_in_a_process(
        tmp_path,
        results,
        [],
        timeout_s=1.0,
        WANDB_MODE="online",
        WANDB_BASE_URL=f"http://127.0.0.1:{port}",
        WANDB_API_KEY=secret,
    )
    assert secret not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "None"
    assert "--wandb: W&B failed" in proc.stderr and "the evaluation's files are written" in proc.stderr


def test_evaluate_merge_command_writes_every_table_with_the_card(tmp_path, capsys):
    """`python -m salnet.evaluate --merge` (its main, in this process) writes every table with the card."""
    from salnet.evaluation import evaluate

    a = write_input(tmp_path / "A", {("DS", "one"): 1})
    b = write_input(tmp_path / "B", {("DS", "two"): 2})
    out = tmp_path / "C"
    evaluate.main(["--merge", str(a), str(b), "--out", str(out)])
    lines = (out / "results.csv").read_text().splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert [r["method"] for r in rows] == ["one", "two"] and lines[0] == f"# metrics card: {card.FORMAT}"
    assert "| thresholds |" in (out / "results.md").read_text()
    assert (out / "results.tex").read_text().startswith(f"% metrics card: {card.FORMAT}\n")
    assert json.loads((out / "results.json").read_text())["results"]["DS"]["one"]["p"]["maxF"]["two"] > 0
    with pytest.raises(SystemExit) as exited:
        evaluate.main(["--merge", str(a), str(tmp_path / "A" / "curves.json"), "--out", str(tmp_path / "D")])
    assert exited.value.code == 1 and "is a curves.json" in capsys.readouterr().err
