"""Per-image statistics, bootstrap intervals and paired tests (salnet.metrics.per_image, .bootstrap) and
what `salnet.evaluate --bootstrap` writes: real SODMetrics rows, real gloo ranks, real files."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from salnet.bench import bootstrap as bootstrap_bench
from salnet.evaluation import evaluate, tables
from salnet.metrics import FAMILIES, PerImage, SODMetrics
from salnet.metrics.bootstrap import Draws, bootstrap, paired_p_values

from conftest import REPO, forked_run, ranks
from metrics_shard_probe import sample_pairs
from per_image_probe import COUNT, keys
from shards_data import save, scene

PROBE = REPO / "tests" / "per_image_probe.py"


def _close(got: dict, want: dict, tolerance: float) -> None:
    """Within `tolerance`, relative above 1 (an HCE or a tiny image's E-measure can be large)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert abs(got[key] - value) <= tolerance * max(1.0, abs(value)), (key, got[key], value)


def synthetic_rows(count: int, seed: int, quality: float = 1.0, side: int = 16) -> PerImage:
    """`count` real SODMetrics rows (F, S, MAE) of synthetic disc masks and noisy maps of them; each
    map's quality is uniform in [0, `quality`], so images differ the way a test set's do."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.arange(side)[:, None].float(), torch.arange(side)[None, :].float()
    cy, cx = ((torch.rand(count, 1, 1, generator=gen) * 0.6 + 0.2) * side for _ in range(2))
    radius = (torch.rand(count, 1, 1, generator=gen) * 0.25 + 0.1) * side
    distance2 = (ys - cy) ** 2 + (xs - cx) ** 2
    weight = torch.rand(count, 1, 1, generator=gen) * quality
    soft = torch.sigmoid((radius * radius - distance2) / (2 * radius))
    pred = (weight * soft + (1 - weight) * torch.rand(count, side, side, generator=gen)).clamp(0, 1)
    metrics = SODMetrics(("F", "S", "MAE"), per_image=True)
    metrics.update(pred, distance2 <= radius * radius, keys=[f"{i:05d}" for i in range(count)])
    return metrics.per_image()


def drawn(pool: PerImage, index: np.ndarray) -> PerImage:
    """The pool's rows at `index` (with repeats) as a test set of its own."""
    return PerImage(
        pool.families, [f"{i:05d}" for i in range(len(index))], {k: v[index] for k, v in pool.values.items()}
    )


@pytest.fixture(scope="module")
def pool():
    """A large population of images whose dataset metrics are known exactly: the pool's own."""
    torch.set_num_threads(1)
    return synthetic_rows(4000, seed=0)


# --------------------------------------------------------------------------------------------
# Per-image rows
# --------------------------------------------------------------------------------------------


def test_per_image_rows_reproduce_compute_for_every_family_in_key_order():
    pairs = sample_pairs(COUNT)  # mixed sizes in one list: grouped by size inside update()
    metrics = SODMetrics(FAMILIES, per_image=True)
    metrics.update([p for p, _ in pairs[:9]], [g for _, g in pairs[:9]], keys=keys()[:9])
    metrics.update([p for p, _ in pairs[9:]], [g for _, g in pairs[9:]], keys=keys()[9:])
    rows = metrics.per_image()
    assert rows.keys == sorted(keys()) and rows.families == FAMILIES
    _close(rows.compute(), metrics.compute(), 1e-6)
    # Each row is that image's own: SODMetrics on the image alone gives it.
    for i in (0, 1, 3, 7, 14):
        alone = SODMetrics(FAMILIES, per_image=True)
        alone.update([pairs[i][0]], [pairs[i][1]], keys=["x"])
        row = rows.keys.index(keys()[i])
        _close(
            {k: v[row] for k, v in rows.values.items() if v.ndim == 1},
            {k: v[0] for k, v in alone.per_image().values.items() if v.ndim == 1},
            0,
        )
        assert rows["MAE"].dtype == np.float64 and rows.values["F"].dtype == np.float32
        np.testing.assert_allclose(rows["F"][row], alone.per_image()["F"][0], rtol=0, atol=0)
        _close(alone.per_image().compute(), alone.compute(), 1e-6)


def test_per_image_rows_are_opt_in_need_keys_and_refuse_a_key_twice(tmp_path):
    pred, gt = torch.rand(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.uint8)
    plain = SODMetrics(("MAE",))
    plain.update(pred, gt)  # training's validation: no keys, nothing kept
    with pytest.raises(RuntimeError, match="per_image=True"):
        plain.per_image()
    kept = SODMetrics(("MAE",), per_image=True)
    with pytest.raises(ValueError, match=r"needs keys=\[one per image\]"):
        kept.update(pred, gt)
    with pytest.raises(ValueError, match="update got 1 keys for 2 images"):
        kept.update(pred, gt, keys=["a"])
    kept.update(pred, gt, keys=["b", "a"])
    kept.update(pred[:1], gt[:1], keys=["b"])
    with pytest.raises(ValueError, match=r"1 image keys occur twice \('b'\)"):
        kept.per_image()
    kept.reset()
    kept.update(pred, gt, keys=["b", "a"])
    rows = kept.per_image()
    rows.save(tmp_path / "rows.npz")
    again = PerImage.load(tmp_path / "rows.npz")
    assert again.keys == ["a", "b"] and again.families == ("MAE",)
    np.testing.assert_array_equal(again["MAE"], rows["MAE"])


@pytest.mark.slow
def test_per_image_rows_gathered_over_two_gloo_ranks_equal_one_process(tmp_path):
    ranks(2, [PROBE, tmp_path / "two.npz"])
    forked_run([PROBE, tmp_path / "one.npz"])
    two, one = PerImage.load(tmp_path / "two.npz"), PerImage.load(tmp_path / "one.npz")
    assert two.keys == one.keys == sorted(keys()) and two.values.keys() == one.values.keys()
    for name in one.values:
        np.testing.assert_array_equal(two.values[name], one.values[name], err_msg=name)


# --------------------------------------------------------------------------------------------
# Intervals and paired tests
# --------------------------------------------------------------------------------------------


def test_intervals_cover_the_true_metric_in_about_95_percent_of_test_sets(pool):
    truth = pool.compute()
    rng = np.random.default_rng(0)
    covered = dict.fromkeys(truth, 0)
    draws = 200
    for d in range(draws):
        found = bootstrap({"m": drawn(pool, np.sort(rng.integers(0, len(pool), 200)))}, 1000, seed=d)
        for name, (lo, hi) in found.intervals["m"].items():
            covered[name] += lo <= truth[name] <= hi
    rates = {name: hits / draws for name, hits in covered.items()}
    assert rates.keys() == {"maxF", "meanF", "adpF", "S", "MAE"}
    assert all(0.90 <= rate <= 0.98 for rate in rates.values()), rates


def test_the_paired_test_keeps_its_level_under_the_null_and_finds_a_better_method(pool):
    # Exchangeable pairs: each image's two rows come from two independent maps of one quality law.
    other = synthetic_rows(len(pool), seed=1)
    rng = np.random.default_rng(1)
    rejected = {"maxF": 0, "MAE": 0}
    for d in range(200):
        index = rng.integers(0, len(pool), 100)
        p = paired_p_values(drawn(pool, index), drawn(other, index), Draws(500, seed=d))
        for name in rejected:
            rejected[name] += p[name] < 0.05
    assert all(0.01 <= count / 200 <= 0.10 for count in rejected.values()), rejected

    worse = synthetic_rows(300, seed=2, quality=0.5)
    better = synthetic_rows(300, seed=2)
    found = bootstrap({"better": better, "worse": worse, "same": better}, 1000, seed=0)
    for name in ("maxF", "meanF", "adpF", "S", "MAE"):
        assert found.p_values["better"][name]["worse"] < 0.01, name
        assert found.p_values["worse"][name]["better"] == found.p_values["better"][name]["worse"]
        assert found.p_values["better"][name]["same"] == 1.0  # identical rows: never significant
        assert found.intervals["better"][name] == found.intervals["same"][name]  # the same resamples


def test_max_metrics_come_from_the_resampled_mean_curve_not_per_image_maxima(pool):
    rows = drawn(pool, np.arange(300))
    found = bootstrap({"m": rows}, 200, seed=0)
    lo, hi = found.intervals["m"]["maxF"]
    assert lo <= rows.compute()["maxF"] <= hi
    assert rows["F"].max(1).mean() > hi  # the mean of per-image maxima is far above any resample's maxF


def test_the_same_seed_gives_the_same_results_and_bad_settings_are_refused(pool):
    rows = drawn(pool, np.arange(100))
    first, again, other = (
        bootstrap({"a": rows, "b": drawn(pool, np.arange(100, 200))}, 100, seed) for seed in (3, 3, 4)
    )
    assert first.intervals == again.intervals and first.p_values == again.p_values
    assert first.intervals != other.intervals
    # Partly different images (--allow-missing): intervals on each one's own, tests on the shared ones.
    part, apart = drawn(pool, np.arange(50)), drawn(pool, np.arange(50, 100))
    apart.keys = [f"{i:05d}" for i in range(50, 100)]  # shares these with "a", none with "part"
    found = bootstrap({"a": rows, "part": part, "apart": apart}, 100, seed=0)
    assert set(found.p_values["a"]["MAE"]) == {"part", "apart"} and set(found.p_values["part"]["MAE"]) == {"a"}
    assert found.p_values["a"]["MAE"]["part"] == found.p_values["a"]["MAE"]["apart"] == 1.0  # shared images: same rows
    with pytest.raises(ValueError, match="resamples must be at least 1, got 0"):
        bootstrap({"a": rows}, 0)
    only_mae = PerImage(("MAE",), rows.keys, {"MAE": rows.values["MAE"]})
    with pytest.raises(ValueError, match="different metric families"):
        bootstrap({"a": rows, "b": only_mae}, 10)


# --------------------------------------------------------------------------------------------
# salnet.evaluate --bootstrap, end to end on folders
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Eight masks and two methods' maps of them: 'sharp' (the mask, lightly noised) and 'noisy'."""
    root = tmp_path_factory.mktemp("bootstrap")
    rng = np.random.default_rng(0)
    for i in range(8):
        mask = scene(40, 48, seed=i)[1]
        save(Image.fromarray(mask), root / "gt" / f"s{i}.png")
        for method, noise in (("sharp", 40), ("noisy", 160)):
            level = np.clip(mask * (1 - noise / 255) + rng.random(mask.shape) * noise, 0, 255).astype(np.uint8)
            save(Image.fromarray(level), root / method / f"s{i}.png")
    return root


def run_evaluate(root, out, *extra):
    args = evaluate.parse_args(
        ["--pred", f"sharp={root / 'sharp'}", "--pred", f"noisy={root / 'noisy'}", "--gt", f"D={root / 'gt'}"]
        + ["--metrics", "F", "S", "MAE", "--out", str(out), *extra]
    )
    return evaluate.evaluate_main(args)


def test_evaluate_writes_intervals_p_values_and_per_image_rows_and_bootstrap_0_omits_them(folders, tmp_path):
    report = run_evaluate(folders, tmp_path / "a", "--bootstrap", "200", "--seed", "5")
    document = json.loads((tmp_path / "a" / "results.json").read_text())
    assert document["format"] == "salnet-results/2" and document["made"]["command"].startswith(
        "python -m salnet.evaluate"
    )
    assert document["bootstrap"]["resamples"] == 200 and document["bootstrap"]["seed"] == 5
    assert document["card"]["bootstrap"] == document["bootstrap"]
    sharp = document["results"]["D"]["sharp"]
    assert set(sharp["ci95"]) == {"maxF", "meanF", "adpF", "S", "MAE"}
    assert all(lo <= sharp[name] <= hi for name, (lo, hi) in sharp["ci95"].items())
    assert set(sharp["p"]["maxF"]) == {"noisy"} and sharp["p"]["MAE"]["noisy"] < 0.05
    rows = PerImage.load(tmp_path / "a" / "per_image" / "D" / "noisy.npz")
    assert rows.keys == [f"s{i}" for i in range(8)] == report.per_image["D"]["sharp"].keys
    np.testing.assert_array_equal(rows["MAE"], report.per_image["D"]["noisy"]["MAE"])
    assert rows.compute()["MAE"] == pytest.approx(document["results"]["D"]["noisy"]["MAE"], abs=1e-12)
    lo, hi = sharp["ci95"]["maxF"]
    assert f"[{lo:.4f}, {hi:.4f}]" in (tmp_path / "a" / "results.md").read_text()
    assert tables.LEGEND in (tmp_path / "a" / "results.md").read_text()
    row = next(csv.DictReader(line for line in (tmp_path / "a" / "results.csv").open() if not line.startswith("#")))
    assert (float(row["maxF_lo"]), float(row["maxF_hi"])) == (lo, hi)

    run_evaluate(folders, tmp_path / "b", "--bootstrap", "200", "--seed", "5")
    assert json.loads((tmp_path / "b" / "results.json").read_text())["results"] == document["results"]

    run_evaluate(folders, tmp_path / "off", "--bootstrap", "0")
    off = json.loads((tmp_path / "off" / "results.json").read_text())
    assert off["bootstrap"] is None and not {"ci95", "p"} & set(off["results"]["D"]["sharp"])
    assert {k: v for k, v in sharp.items() if k not in ("ci95", "p")} == off["results"]["D"]["sharp"]
    assert "[" not in (tmp_path / "off" / "results.md").read_text().split("|:--|")[1]
    assert "maxF_lo" not in (tmp_path / "off" / "results.csv").read_text()
    assert (tmp_path / "off" / "per_image" / "D" / "sharp.npz").is_file()  # kept for the gallery all the same


def test_bootstrap_flag_refuses_a_negative_count(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--pred", "p", "--gt", "g", "--bootstrap", "-1"])
    assert "--bootstrap must be 0 (no intervals) or a number of resamples, got -1" in capsys.readouterr().err


def test_benchmark_runs_at_toy_size_and_reports_every_stage(capsys):
    bootstrap_bench.main(
        ["--images", "40", "--methods", "3", "--resamples", "20", "--repeats", "1", "--loop-resamples", "2"]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"] == 3 and result["threads"] == 1
    assert set(result["seconds"]) == {"draws", "intervals", "paired", "total"} and result["looped_intervals_s"] > 0
