"""salnet.evaluate end to end: folders of maps against PySODMetrics, a checkpoint against validation,
tables, curves and plots (real files, real gloo ranks, CPU)."""

import csv
import json
import math
import warnings

import cv2
import numpy as np
import py_sod_metrics
import pytest
import torch
from evaluation_data import SIZES, ecssd_folder, tiny_checkpoint
from PIL import Image

from salnet.bench.metrics import run_reference
from salnet.config import DataConfig
from salnet.data import ValStream
from salnet.evaluation import evaluate
from salnet.evaluation.common import load_best_weights, make_predict
from salnet.metrics import PerImage, SODMetrics, curve_plots, metric_names
from salnet.validate import validate

from conftest import forked_run, ranks, run_py
from shards_data import encode, save, scene

METRICS = ["maxF", "meanF", "adpF", "maxE", "meanE", "adpE", "S", "wF", "MAE"]


def noisy_map(mask: np.ndarray, seed: int, quality: float) -> np.ndarray:
    """A plausible saliency map: the mask blurred, mixed with noise; `quality` in [0, 1]."""
    rng = np.random.default_rng(seed)
    blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 3)
    return np.clip(quality * blurred + (1 - quality) * 255 * rng.random(mask.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Two datasets (a mask folder, and an ECSSD-layout folder) and three methods' maps of them:
    'good' PNGs at the masks' size, 'small' PNGs at 32x40 (resized to the masks' by evaluate), 'rgb' JPEGs of
    grey maps stored as RGB (read as that grey; a colour map is refused, test_colour_...)."""
    root = tmp_path_factory.mktemp("maps")
    for i, (h, w) in enumerate(SIZES[:6]):
        save(Image.fromarray(scene(h, w, seed=100 + i)[1]), root / "gt-a" / f"a{i}.png")
    ecssd_folder(root / "ECSSD", 5, first_seed=200)
    truths = {"DS-A": root / "gt-a", "ECSSD": root / "ECSSD" / "ground_truth_mask"}
    for dataset, gt_dir in truths.items():
        for k, gt_path in enumerate(sorted(gt_dir.iterdir())):
            mask = np.asarray(Image.open(gt_path))
            good = noisy_map(mask, seed=k, quality=0.8)
            save(Image.fromarray(good), root / "good" / dataset / gt_path.name)
            save(
                Image.fromarray(noisy_map(mask, seed=k, quality=0.6)).resize((40, 32), Image.Resampling.BILINEAR),
                root / "small" / dataset / gt_path.name,
            )
            grey_as_rgb = np.stack([noisy_map(mask, seed=k + 50, quality=0.5)] * 3, -1)
            save(Image.fromarray(grey_as_rgb), root / "rgb" / dataset / f"{gt_path.stem}.jpg")
    return root, truths


def reference(gt_dir, pred_dir, stems=None):
    """PySODMetrics 1.6.2 on the pairs read as PySODEvalToolkit reads them (cv2 grayscale, bilinear resize)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f, e, s, wf, mae = (
            py_sod_metrics.Fmeasure(),
            py_sod_metrics.Emeasure(),
            py_sod_metrics.Smeasure(),
            py_sod_metrics.WeightedFmeasure(),
            py_sod_metrics.MAE(),
        )
    preds = {p.stem: p for p in pred_dir.iterdir()}
    for gt_path in sorted(gt_dir.iterdir()):
        if stems is not None and gt_path.stem not in stems:
            continue
        gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE)
        pred = cv2.imread(str(preds[gt_path.stem]), cv2.IMREAD_GRAYSCALE)
        if pred.shape != gt.shape:
            pred = cv2.resize(pred, dsize=gt.shape[::-1], interpolation=cv2.INTER_LINEAR).astype(np.uint8)
        for metric in (f, e, s, wf, mae):
            metric.step(pred=pred, gt=gt)
    fr, er = f.get_results(), e.get_results()
    values = {
        "maxF": fr["fm"]["curve"].max(),
        "meanF": fr["fm"]["curve"].mean(),
        "adpF": fr["fm"]["adp"],
        "maxE": er["em"]["curve"].max(),
        "meanE": er["em"]["curve"].mean(),
        "adpE": er["em"]["adp"],
        "S": s.get_results()["sm"],
        "wF": wf.get_results()["wfm"],
        "MAE": mae.get_results()["mae"],
    }
    return {k: float(v) for k, v in values.items()}, fr["pr"]


@pytest.fixture(scope="module")
def evaluated(maps):
    """One sharded evaluation of the three methods on the two datasets, with every output."""
    root, truths = maps
    out = root / "results"
    proc = ranks(
        2,
        [
            "-m",
            "salnet.evaluate",
            "--pred",
            f"good={root / 'good'}",
            "--pred",
            str(root / "small"),
            "--pred",
            f"rgb={root / 'rgb'}",
            "--gt",
            f"DS-A={truths['DS-A']}",
            "--gt",
            str(root / "ECSSD"),
            "--out",
            out,
        ],
        timeout=240,
    )
    return out, proc


@pytest.mark.slow
def test_maps_in_folders_score_as_pysodmetrics_for_several_methods_and_datasets(maps, evaluated):
    root, truths = maps
    out, proc = evaluated
    results = json.loads((out / "results.json").read_text())["results"]
    curves = json.loads((out / "curves.json").read_text())
    assert list(results) == ["DS-A", "ECSSD"]
    for dataset, gt_dir in truths.items():
        assert list(results[dataset]) == ["good", "small", "rgb"]
        for method in ("good", "small", "rgb"):
            want, pr = reference(gt_dir, root / method / dataset)
            got = results[dataset][method]
            assert got["images"] == len(list(gt_dir.iterdir())) and got["missing"] == got["extra"] == 0
            for key in METRICS:
                assert not math.isnan(want[key]), (dataset, method, key)
                assert got[key] == pytest.approx(want[key], abs=1e-6), (dataset, method, key)
            curve = curves[dataset][method]
            assert curve["threshold"] == list(range(255, -1, -1))
            np.testing.assert_allclose(curve["precision"], pr["p"], atol=1e-6)
            np.testing.assert_allclose(curve["recall"], pr["r"], atol=1e-6)
    for dataset in truths:  # the console table: a row per method under each dataset
        assert dataset in proc.stdout
        assert all(any(line.startswith(m) for line in proc.stdout.splitlines()) for m in ("good", "small", "rgb"))


@pytest.mark.slow
def test_tables_hold_every_result(maps, evaluated):
    out, _ = evaluated
    results = json.loads((out / "results.json").read_text())["results"]
    rows = list(csv.DictReader(line for line in (out / "results.csv").open() if not line.startswith("#")))
    assert [(r["dataset"], r["method"]) for r in rows] == [(d, m) for d, by in results.items() for m in by]
    for row in rows:
        assert {k: float(row[k]) for k in METRICS} == {k: results[row["dataset"]][row["method"]][k] for k in METRICS}
    md, tex = (out / "results.md").read_text(), (out / "results.tex").read_text()
    best_maxf = max(results["ECSSD"].values(), key=lambda s: s["maxF"])["maxF"]
    assert f"**{best_maxf:.4f}**" in md and md.count("| good |") == 2
    assert r"\multicolumn{9}{c}{DS-A}" in tex and r"MAE$\downarrow$" in tex and f"\\textbf{{{best_maxf:.3f}}}" in tex
    assert tex.count(r"\\") == 2 + 3 + 1  # two header rows, three methods, the legend
    # every format shows each value's 95 % interval (evaluate's default --bootstrap 1000)
    for row in rows:
        ci95 = results[row["dataset"]][row["method"]]["ci95"]
        assert {k: (float(row[k + "_lo"]), float(row[k + "_hi"])) for k in METRICS} == {
            k: tuple(ci95[k]) for k in METRICS
        }
    lo, hi = results["ECSSD"]["good"]["ci95"]["maxF"]
    assert f"[{lo:.4f}, {hi:.4f}]" in md and f"{{\\scriptsize[{lo:.3f}, {hi:.3f}]}}" in tex
    assert "not significantly different from the best" in md and "not significantly different" in tex


@pytest.mark.slow
def test_plots_are_real_pngs_with_one_line_per_method(evaluated):
    out, _ = evaluated
    for dataset in ("DS-A", "ECSSD"):
        for kind in ("pr", "fm"):
            with Image.open(out / "plots" / f"{kind}_{dataset}.png") as im:
                assert im.format == "PNG" and im.size == (750, 630)
                colours = len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0))
            assert colours > 50, "an empty plot"
    curves = json.loads((out / "curves.json").read_text())
    figures = curve_plots.figures(curves)
    assert sorted(figures) == ["fm_DS-A", "fm_ECSSD", "pr_DS-A", "pr_ECSSD"]
    for name, fig in figures.items():
        (ax,) = fig.axes
        assert [line.get_label() for line in ax.lines] == ["good", "small", "rgb"], name
        assert len({line.get_color() for line in ax.lines}) == 3
        dataset = name.split("_", 1)[1]
        x, y = ax.lines[1].get_data()
        want = curves[dataset]["small"]
        assert list(x) == (want["recall"] if name.startswith("pr") else want["threshold"])
        assert list(y) == (want["precision"] if name.startswith("pr") else want["F"])


def test_missing_and_extra_maps_are_listed_or_counted(maps, tmp_path, capsys):
    root, truths = maps
    pred = tmp_path / "partial"  # one dataset: the maps directly in the method's folder
    for path in sorted((root / "good" / "DS-A").iterdir())[1:]:
        (pred / path.name).parent.mkdir(exist_ok=True)
        (pred / path.name).write_bytes(path.read_bytes())
    (pred / "stray.png").write_bytes((root / "good" / "DS-A" / "a0.png").read_bytes())
    args = ["--pred", f"partial={pred}", "--gt", f"DS-A={truths['DS-A']}", "--metrics", "F", "MAE"]
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert "1 ground truths have no prediction" in err and "a0" in err
    assert "1 predictions" in err and "stray" in err and "--allow-missing" in err

    evaluate.main(args + ["--allow-missing", "--out", str(tmp_path / "out")])
    got = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["DS-A"]["partial"]
    assert (got["images"], got["missing"], got["extra"]) == (5, 1, 1)
    want, _ = reference(truths["DS-A"], pred, stems={f"a{i}" for i in range(1, 6)})
    assert set(got) == {"maxF", "meanF", "adpF", "MAE", "images", "missing", "extra", "ci95", "p"}
    assert set(got["ci95"]) == {"maxF", "meanF", "adpF", "MAE"} and got["p"] == {}  # no other method to test against
    for key in ("maxF", "meanF", "adpF", "MAE"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert "5 (1 missing, 1 extra)" in capsys.readouterr().out


def test_opt_in_metric_families_are_the_only_columns_added_and_equal_pysodmetrics(maps, tmp_path, capsys):
    root, truths = maps
    families = ["IoU", "SI-F", "HCE"]
    out = tmp_path / "out"
    evaluate.main(
        ["--pred", f"good={root / 'good'}", "--gt", f"DS-A={truths['DS-A']}", "--metrics", *families, "--out", str(out)]
    )
    got = json.loads((out / "results.json").read_text())["results"]["DS-A"]["good"]
    assert list(got) == [*metric_names(families), "images", "missing", "extra", "ci95", "p"]
    stems = sorted(truths["DS-A"].iterdir())
    masks = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in stems]
    preds = [cv2.imread(str(root / "good" / "DS-A" / p.name), cv2.IMREAD_GRAYSCALE) for p in stems]
    want = run_reference(families, preds, masks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert "SI-maxF" in capsys.readouterr().out and r"HCE$\downarrow$" in (out / "results.tex").read_text()


@pytest.mark.slow
def test_a_checkpoint_on_shards_scores_what_validation_and_its_predicted_maps_score(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "run")
    ecssd_folder(tmp_path / "ECSSD", 7, first_seed=300)
    shards = tmp_path / "shards" / "ecssd"
    run_py(["-m", "salnet.shards", "pack", tmp_path / "ECSSD", shards])

    ranks(
        2,
        [
            "-m",
            "salnet.evaluate",
            "--checkpoint",
            f"tiny={checkpoint}",
            "--data",
            f"ECSSD={shards}",
            "--batch-size",
            "1",
            "--workers",
            "0",
            "--out",
            tmp_path / "ckpt",
        ],
        timeout=240,
    )
    from_checkpoint = json.loads((tmp_path / "ckpt" / "results.json").read_text())["results"]["ECSSD"]["tiny"]

    # validate() in this process, one rank, on the same set: what training would have logged
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1): same kernels, same floats
    ckpt = load_best_weights(checkpoint)
    data = DataConfig.model_validate({**ckpt.config["data"], "val": [str(shards)], "eval_batch_size": 1, "workers": 0})
    metrics = SODMetrics(["F", "E", "S", "wF", "MAE"])
    validated = validate(make_predict(ckpt, "fp32"), ValStream(data, 0, 1), metrics)
    assert from_checkpoint["images"] == 7
    for key in METRICS:
        assert from_checkpoint[key] == pytest.approx(validated[key], abs=1e-9), key

    # the same checkpoint's published maps, scored as folders, give the same numbers
    forked_run(
        [
            "-m",
            "salnet.predict",
            "--checkpoint",
            checkpoint,
            f"ECSSD={shards}",
            "--out",
            tmp_path / "maps",
            "--batch-size",
            "1",
        ]
    )
    forked_run(
        [
            "-m",
            "salnet.evaluate",
            "--pred",
            f"tiny={tmp_path / 'maps'}",
            "--gt",
            f"ECSSD={tmp_path / 'ECSSD'}",
            "--out",
            tmp_path / "folders",
        ]
    )
    from_maps = json.loads((tmp_path / "folders" / "results.json").read_text())["results"]["ECSSD"]["tiny"]
    for key in METRICS:
        assert from_maps[key] == pytest.approx(from_checkpoint[key], abs=1e-9), key
    # per image too, keyed alike: a shard sample's key is its image's stem, as a map's file stem is
    by_key, by_stem = (
        PerImage.load(tmp_path / kind / "per_image" / "ECSSD" / "tiny.npz") for kind in ("ckpt", "folders")
    )
    assert by_key.keys == by_stem.keys and len(by_key.keys) == 7
    np.testing.assert_allclose(by_key["MAE"], by_stem["MAE"], rtol=0, atol=1e-9)


def test_bad_arguments_are_refused_with_the_value_at_fault(maps, tmp_path, capsys):
    root, truths = maps
    for args, words in (
        (["--pred", f"good={root / 'good'}", "--gt", f"NOPE={truths['DS-A']}"], ["has no folder 'NOPE'", "DS-A"]),
        (["--checkpoint", str(tmp_path / "missing.pt"), "--data", f"X={tmp_path}"], ["missing.pt", "does not exist"]),
        (  # checked before scoring, not at the first write after it
            [
                "--pred",
                f"good={root / 'good'}",
                "--gt",
                f"DS-A={truths['DS-A']}",
                "--out",
                str(root / "gt-a" / "a0.png"),
            ],
            [f"--out '{root / 'gt-a' / 'a0.png'}' is a file, not a folder"],
        ),
    ):
        with pytest.raises(SystemExit) as exit_:
            evaluate.main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and all(w in err for w in words) and "Traceback" not in err, err


def _grey_palette(values: np.ndarray) -> Image.Image:
    im = Image.fromarray(values)
    im.putpalette([v for i in range(256) for v in (i, i, i)])  # L becomes P: index i shows grey i
    return im


def test_a_mask_or_map_reads_the_same_however_grey_is_stored_and_as_pack_stores_it(tmp_path):
    """Issue 22, item 3: one reading rule for masks (pack, evaluate's folders) and maps, whatever the storage."""
    from salnet.data.sources import Limits
    from salnet.evaluation import folders
    from salnet.shards.pack import pack

    from shards_data import by_source

    rgb, mask = scene(32, 40, seed=7)
    level = noisy_map(mask, seed=7, quality=0.7)
    opaque = np.full_like(mask, 255)
    stored = {  # stem: (mask as stored, map as stored, the map's levels as read)
        "grey": (Image.fromarray(mask), Image.fromarray(level), level),
        "rgb": (Image.fromarray(np.stack([mask] * 3, -1)), Image.fromarray(np.stack([level] * 3, -1)), level),
        "palette": (_grey_palette(mask), _grey_palette(level), level),
        "sixteen": (
            Image.fromarray(mask.astype(np.uint16) * 257),
            Image.fromarray(level.astype(np.uint16) * 257),
            level,
        ),
        "alpha": (  # grey x alpha: white with the mask as alpha is the mask
            Image.fromarray(np.stack([opaque, mask], -1), "LA"),
            Image.fromarray(np.dstack([level, level, level, opaque]), "RGBA"),
            level,
        ),
        "zero_one": (Image.fromarray(mask // 255), Image.fromarray(level // 128), level // 128),  # a map is kept as is
    }
    for stem, (mask_im, map_im, _) in stored.items():
        save(mask_im, tmp_path / "src" / "gt" / f"{stem}.png")
        save(map_im, tmp_path / "maps" / f"{stem}.png")
        save(Image.fromarray(rgb), tmp_path / "src" / "img" / f"{stem}.png")
    pack(tmp_path / "src", tmp_path / "shards", images="img", masks="gt", workers=1)
    packed = by_source(tmp_path / "shards")
    for stem, (_, _, want_map) in stored.items():
        pred, gt = folders.read_pair(
            tmp_path / "src" / "gt" / f"{stem}.png", tmp_path / "maps" / f"{stem}.png", Limits()
        )
        assert np.array_equal(gt.numpy(), mask), stem
        assert np.array_equal(packed[f"{stem}.png"][1], mask), stem  # pack stored what evaluate reads
        assert np.array_equal((pred * 255).round().numpy().astype(np.uint8), want_map), stem


def _bad_pair_cases(root):
    """Two good pairs (g0, g1) and pairs whose mask or map evaluate cannot read (b_*) in root/gt and
    root/pred; returns {stem: (the bad file, words its refusal holds)}."""
    from shards_data import png_bomb

    red = np.zeros((32, 40, 3), np.uint8)
    red[8:24, 10:30] = (255, 0, 0)  # red on black: no one grey reading
    mask = (red[..., 0] > 0).astype(np.uint8) * 255
    level = noisy_map(mask, seed=1, quality=0.8)
    for stem in ("g0", "g1"):
        save(Image.fromarray(mask), root / "gt" / f"{stem}.png")
        save(Image.fromarray(level), root / "pred" / f"{stem}.png")
    png = {"gt": (root / "gt" / "g0.png").read_bytes(), "pred": (root / "pred" / "g0.png").read_bytes()}
    jpg = save(Image.fromarray(level), root / "level.jpg").read_bytes()
    cases = {  # stem: (the bad one, its file name, its bytes, words)
        "b_truncated_mask": ("gt", "b_truncated_mask.png", png["gt"][: len(png["gt"]) // 2], "truncated"),
        "b_truncated_map": ("pred", "b_truncated_map.jpg", jpg[: len(jpg) // 2], "truncated"),
        "b_colour_mask": ("gt", "b_colour_mask.png", encode(Image.fromarray(red)), "in colour"),
        "b_colour_map": (
            "pred",
            "b_colour_map.png",
            encode(Image.fromarray(np.dstack([level, level // 2, level]))),
            "in colour",
        ),
        "b_huge_mask": ("gt", "b_huge_mask.png", png_bomb(10000, 10000), "above the limit of 64.0 MP"),
        "b_sparse_map": ("pred", "b_sparse_map.jpg", jpg, "above the limit of 268435456 bytes"),
    }
    bad = {}
    for stem, (which, name, data, words) in cases.items():
        (root / which / name).write_bytes(data)
        other = "pred" if which == "gt" else "gt"
        (root / other / f"{stem}.png").write_bytes(png[other])
        bad[stem] = (root / which / name, words)
    with open(root / "pred" / "b_sparse_map.jpg", "r+b") as f:
        f.truncate(300 * 2**20)  # a JPEG followed by 300 MiB of (sparse) zeros: refused unread
    return bad


def _linked(folder, files):
    folder.mkdir(parents=True)
    for file in files:
        (folder / file.name).symlink_to(file)
    return folder


def test_a_corrupt_colour_or_oversized_map_or_mask_is_named_or_skipped_counted_and_listed(tmp_path, capsys):
    """Issue 22, items 3 and 4: refused naming the file (not read as grey, not decoded partially, not
    decoded or read past the limits), or left out with --skip-bad, counted and listed."""
    bad = _bad_pair_cases(tmp_path)
    metrics = ["--metrics", "F", "MAE"]
    for stem, (path, words) in bad.items():
        one = tmp_path / "one" / stem  # the bad pair and a good one
        for which in ("gt", "pred"):
            _linked(one / which, [f for name in ("g0", stem) for f in (tmp_path / which).glob(f"{name}.*")])
        with pytest.raises(SystemExit) as exit_:
            evaluate.main(["--pred", f"m={one / 'pred'}", "--gt", f"D={one / 'gt'}", *metrics])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and "Traceback" not in err, (stem, err)
        named = one / path.parent.name / path.name
        assert f"{named}: " in err and words in err and "--skip-bad" in err, (stem, err)

    evaluate.main(
        ["--pred", f"m={tmp_path / 'pred'}", "--gt", f"D={tmp_path / 'gt'}", *metrics, "--skip-bad"]
        + ["--out", str(tmp_path / "skip")]
    )
    out, err = capsys.readouterr()
    got = json.loads((tmp_path / "skip" / "results.json").read_text())["results"]["D"]["m"]
    assert (got["images"], got["skipped"]) == (2, len(bad)) and f"2 ({len(bad)} skipped)" in out
    assert f"skipped {len(bad)} pairs" in err and all(str(path) in err for path, _ in bad.values()), err

    good = tmp_path / "good"
    for which in ("gt", "pred"):
        _linked(good / which, sorted((tmp_path / which).glob("g*.png")))
    evaluate.main(["--pred", f"m={good / 'pred'}", "--gt", f"D={good / 'gt'}", *metrics, "--out", str(good / "out")])
    want = json.loads((good / "out" / "results.json").read_text())["results"]["D"]["m"]
    assert {k: got[k] for k in want} == want  # the readable pairs score as they would alone
