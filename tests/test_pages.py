"""The results page and the run page, opened as a reader opens them: Debian's Chromium, headless, from disk.

Selenium drives /usr/bin/chromium through Debian's /usr/bin/chromedriver (never Selenium Manager,
which would try to download a driver). Each page is checked for what a reader relies on: no console
error, no request that leaves the machine (only file: and data: URLs in Chromium's network log),
every picture loaded, sorting by a column header, the interval under a value, the values of a
curve on hover; a screenshot of each is saved. Without chromium, chromedriver or selenium the
browser tests skip and say which is missing; the page's own content is checked without a browser.
"""

import html
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluation_data import ecssd_folder, tiny_checkpoint
from PIL import Image, ImageFilter

from salnet.evaluation import evaluate, folders
from salnet.evaluation.gallery import GallerySources, choose
from salnet.metrics.per_image import PerImage
from salnet.pages.results import write_results_page
from salnet.pages.sweep import write_sweep_page
from salnet.report import main as report_main
from salnet.run import plots
from salnet.run.rundir import MetricsFile
from salnet.shards.pack import pack
from salnet.validate import PER_IMAGE_METRICS, Sample, SetDetails, per_image_metrics

from shards_data import save, scene

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ODD = 'A&B\'s "<v2>"'  # a method name that is HTML: it must show as text
SCREENSHOTS = os.environ.get("SALNET_SCREENSHOTS")  # a folder: also keep the screenshots there (the README's)


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found (Debian: apt-get install chromium chromium-driver)"
    return None


# --------------------------------------------------------------------------------------------
# A small real evaluation: two datasets (an ECSSD layout with images, a folder of masks), three methods
# --------------------------------------------------------------------------------------------


def _noisy(mask: np.ndarray, seed: int, quality: float) -> np.ndarray:
    """A plausible map: the mask blurred, mixed with blotchy noise (false positives); `quality` in [0, 1]."""
    rng = np.random.default_rng(seed)
    blurred = np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(2)), dtype=np.float64)
    blotches = Image.fromarray((255 * rng.random(mask.shape)).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))
    noise = np.asarray(blotches, dtype=np.float64)
    noise = 255 * (noise - noise.min()) / max(np.ptp(noise), 1)
    return np.clip(quality * blurred + (1 - quality) * noise, 0, 255).astype(np.uint8)


def scored_mae(out: Path, dataset: str, method: str) -> dict[str, float]:
    """Each image's MAE as the evaluation kept it (per_image/DATASET/METHOD.npz: keys, MAE)."""
    with np.load(out / "per_image" / dataset / f"{method}.npz") as z:
        return dict(zip(z["keys"].tolist(), z["MAE"].tolist(), strict=True))


def gallery_maps_score_as_scored(out: Path, description: dict, mae: dict[str, dict[str, float]]) -> None:
    """Every map the gallery drew, scored again from its full-size picture, gives the evaluation's MAE:
    the right image, predicted or read as it was scored."""
    methods = description["columns"][2:]
    for section in description["sections"]:
        for row in section["rows"]:
            gt = np.asarray(Image.open(out / row["cells"][1]["full"]))
            for method, cell in zip(methods, row["cells"][2:], strict=True):
                levels = np.asarray(Image.open(out / cell["full"]))
                again = per_image_metrics([torch.from_numpy(levels).float() / 255], [torch.from_numpy(gt)])["MAE"][0]
                assert again == pytest.approx(mae[method][row["key"]], abs=1e-9), (method, row["key"])


@pytest.fixture(scope="module")
def results_page(tmp_path_factory):
    root = tmp_path_factory.mktemp("pages")
    ecssd_folder(root / "ECSSD", 10, first_seed=40)  # enough images for some differences to be significant
    for i in range(4):
        save(Image.fromarray(scene(40 + 4 * i, 56, seed=60 + i)[1]), root / "masks" / f"m{i}.png")
    truths = {"ECSSD": root / "ECSSD", "plain": root / "masks"}
    methods = {"good": 0.8, "small": 0.78, ODD: 0.4}  # good and small: close, not always told apart
    for dataset, location in truths.items():
        for k, (stem, gt_path) in enumerate(folders.ground_truth(location).items()):
            mask = np.asarray(Image.open(gt_path))
            for j, quality in enumerate(methods.values()):
                save(Image.fromarray(_noisy(mask, 10 * k + j, quality)), root / f"pred{j}" / dataset / f"{stem}.png")
    out = root / "results"
    args = [a for j, m in enumerate(methods) for a in ("--pred", f"{m}=" + str(root / f"pred{j}"))]
    args += [a for d, loc in truths.items() for a in ("--gt", f"{d}={loc}")]
    evaluate.main([*args, "--metrics", "F", "E", "S", "MAE", "--gallery", "2", "--out", str(out)])
    return out / "index.html", json.loads((out / "results.json").read_text())


def test_a_gallery_of_a_checkpoint_and_a_folder_of_maps_shows_the_images_as_they_were_scored(tmp_path):
    """One dataset scored twice: a best.pt on its shards, and maps in a folder against its ECSSD folder."""
    checkpoint = tiny_checkpoint(tmp_path / "run")
    ecssd_folder(tmp_path / "ECSSD", 5, first_seed=300)
    shards = tmp_path / "shards"
    pack(tmp_path / "ECSSD", shards, shard_samples=2)  # three shards: the chosen keys are spread over them
    for k, (stem, gt_path) in enumerate(folders.ground_truth(tmp_path / "ECSSD").items()):
        save(Image.fromarray(_noisy(np.asarray(Image.open(gt_path)), k, 0.5)), tmp_path / "maps" / f"{stem}.png")
    out = tmp_path / "out"
    evaluate.main(
        ["--checkpoint", f"tiny={checkpoint}", "--data", f"ECSSD={shards}"]
        + ["--pred", f"maps={tmp_path / 'maps'}", "--gt", f"ECSSD={tmp_path / 'ECSSD'}"]
        + ["--metrics", "MAE", "--bootstrap", "0", "--out", str(out)]
    )
    sources = GallerySources()
    sources.add_checkpoint("ECSSD", "tiny", str(shards), checkpoint)
    sources.add_folder("ECSSD", "maps", tmp_path / "ECSSD", tmp_path / "maps")
    per_image = {"ECSSD": {m: PerImage.load(out / "per_image" / "ECSSD" / f"{m}.npz") for m in ("tiny", "maps")}}
    description = sources.write(out, per_image, k=3)["ECSSD"]
    mae = {m: scored_mae(out, "ECSSD", m) for m in ("tiny", "maps")}
    titles = ["where the methods differ most", "worst images of tiny", "worst images of maps"]
    assert [s["title"] for s in description["sections"]] == titles and description["columns"][2:] == ["tiny", "maps"]
    gaps = {key: abs(mae["tiny"][key] - mae["maps"][key]) for key in mae["tiny"]}
    assert [row["key"] for row in description["sections"][0]["rows"]] == sorted(gaps, key=gaps.get, reverse=True)[:3]
    worst = [row["key"] for row in description["sections"][1]["rows"]]
    assert worst == sorted(mae["tiny"], key=mae["tiny"].get, reverse=True)[:3]
    gallery_maps_score_as_scored(out, description, mae)
    for row in description["sections"][1]["rows"]:  # the image and its mask as the dataset holds them
        image, gt = (np.asarray(Image.open(out / cell["full"])) for cell in row["cells"][:2])
        source_image = np.asarray(Image.open(tmp_path / "ECSSD" / "images" / f"{row['key']}.jpg"))
        assert np.array_equal(
            gt, np.asarray(Image.open(tmp_path / "ECSSD" / "ground_truth_mask" / f"{row['key']}.png"))
        )
        assert (
            image.shape == source_image.shape and np.abs(image.astype(int) - source_image).mean() < 2
        )  # JPEG decoders


# --------------------------------------------------------------------------------------------
# Without a browser: what the page and the gallery hold
# --------------------------------------------------------------------------------------------


def test_gallery_chooses_the_largest_gaps_and_each_methods_worst():
    mae = {"a": {"x": 0.25, "y": 0.5, "z": 0.125, "w": 0.25}, "b": {"x": 0.5, "y": 0.5, "z": 0.25, "w": 0.0}}
    sections = choose(mae, k=2)
    assert [s.title for s in sections] == ["where the methods differ most", "worst images of a", "worst images of b"]
    # gaps: w 0.25, x 0.25 (a tie: by key), z 0.125, y 0; ties among the worst by key too
    assert [s.keys for s in sections] == [["w", "x"], ["y", "w"], ["x", "y"]]
    assert [s.title for s in choose({"a": mae["a"]}, k=1)] == ["worst images of a"]  # one method: no gaps


def test_results_page_escapes_names_and_links_only_files_beside_it(results_page):
    page, document = results_page
    text = page.read_text()
    assert ODD not in text and "A&amp;B&#x27;s &quot;&lt;v2&gt;&quot;" in text
    sources = [s for s in re.findall(r"(?:src|href)='([^']*)'", text) if not s.startswith("#")]  # not anchors
    assert sources and all(not re.match(r"[a-z]+:", s) and not s.startswith("/") for s in sources)
    for s in sources:
        assert (page.parent / s).is_file(), s
    # every dataset's table, curves and gallery; the card and how it was made
    for dataset in document["results"]:
        assert f">{dataset}</h2>" in text and f"{dataset}: precision-recall" in text
    assert text.count("where the methods differ most") == 2 and html.escape(document["bootstrap"]["test"]) in text
    assert "Metrics card" in text and html.escape(document["made"]["command"]) in text


def test_a_results_page_without_intervals_or_curves(tmp_path):
    """--bootstrap 0 (no intervals, no p-values) and --metrics MAE (curves without PR or F): the table alone."""
    document = {
        "results": {"D": {"a": {"MAE": 0.25, "images": 3}, "b": {"MAE": 0.125, "images": 3}}},
        "bootstrap": None,
    }
    curves = {"D": {"a": {"threshold": list(range(255, -1, -1))}, "b": {"threshold": list(range(255, -1, -1))}}}
    text = write_results_page(tmp_path, document, curves, {}).read_text()
    assert "No intervals" in text and "class='ci'" not in text and "<svg" not in text
    assert not re.search(r"class='[^']*\btie\b", text)  # no p-values: nothing marked as not significant
    assert re.search(r"<td data-v='0.125' class='best'>", text) and re.search(
        r"<td data-v='0.25' class='second'>", text
    )


# --------------------------------------------------------------------------------------------
# In Chromium
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        pytest.skip(f"no browser test: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1300,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # Selenium Manager: never look for (or download) a driver or browser
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def check_loaded_offline(driver) -> list:
    """No console error, no request but file: and data:, every <img> decoded."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), [
        u for u in urls if not u.startswith(("file://", "data:"))
    ]
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
    images = driver.find_elements("tag name", "img")
    sizes = [driver.execute_script("return [arguments[0].complete, arguments[0].naturalWidth]", im) for im in images]
    assert all(done and width > 0 for done, width in sizes), sizes
    return images


def screenshot(driver, path: Path, name: str) -> Path:
    driver.save_screenshot(str(path))
    assert Image.open(path).size[0] > 0
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SCREENSHOTS) / name)
    return path


def hover_tip(driver, chart) -> str:
    from selenium.webdriver import ActionChains

    ActionChains(driver).move_to_element_with_offset(chart, 20, 0).perform()
    tip = driver.find_element("id", "tip")
    assert tip.is_displayed()
    return tip.text


def column(table, index: int) -> list[str]:
    return [
        row.find_elements("tag name", "td")[index].get_attribute("data-v")
        for row in table.find_elements("css selector", "tbody tr")
    ]


def test_results_page_in_chromium(browser, results_page, tmp_path):
    page, document = results_page
    browser.get(page.as_uri())
    images = check_loaded_offline(browser)
    thumbs = {p.as_uri() for p in page.parent.glob("gallery/*/thumbs/*.png")}
    assert {im.get_attribute("src") for im in images} == thumbs and len(thumbs) > 20  # a picture of two sections: once

    table = browser.find_elements("css selector", "table.results")[0]
    heads = [th.text for th in table.find_elements("css selector", "thead th")]
    methods = list(document["results"]["ECSSD"])
    assert column(table, 0) == methods  # as written, before any click
    assert [td.text for td in table.find_elements("css selector", "tbody td:first-child")][2] == ODD  # as text
    mae = heads.index("MAE")
    values = {m: document["results"]["ECSSD"][m]["MAE"] for m in methods}
    table.find_elements("css selector", "thead th")[mae].click()  # lowest MAE first
    assert column(table, 0) == sorted(methods, key=values.get)
    table.find_elements("css selector", "thead th")[mae].click()  # again: the other way round
    assert column(table, 0) == sorted(methods, key=values.get, reverse=True)
    table.find_elements("css selector", "thead th")[0].click()  # by name
    assert column(table, 0) == sorted(methods)

    # the interval under a value and on hover; best marked; a non-significant difference marked
    good = table.find_element("xpath", ".//tbody/tr[td[1][@data-v='good']]")
    cell = good.find_elements("tag name", "td")[mae]
    lo, hi = document["results"]["ECSSD"]["good"]["ci95"]["MAE"]
    assert cell.find_element("class name", "ci").text == f"[{lo:.4f}, {hi:.4f}]"
    assert f"95% interval {lo:.4f} to {hi:.4f}" in cell.get_attribute("title")
    # best and second best marked; a value not significantly different from the best (p >= 0.05) marked too
    scores = document["results"]["ECSSD"]
    body, marks = table.find_elements("css selector", "tbody tr"), set()
    for col, metric in enumerate(heads[1:-1], 1):
        shown = {m: round(scores[m][metric], 4) for m in scores}
        order = sorted(set(shown.values()), reverse=metric != "MAE")
        best = next(m for m in scores if shown[m] == order[0])
        for row in body:
            method = row.find_elements("tag name", "td")[0].get_attribute("data-v")
            classes = row.find_elements("tag name", "td")[col].get_attribute("class").split()
            assert ("best" in classes) == (shown[method] == order[0]), (metric, method)
            assert ("second" in classes) == (shown[method] == order[1]), (metric, method)
            p = scores[method]["p"][metric].get(best)
            assert ("tie" in classes) == (shown[method] != order[0] and p >= 0.05), (metric, method, p)
            marks.add("tie" in classes) if shown[method] != order[0] else None
    assert marks == {True, False}  # both kinds among the values that are not the best

    # a curve's values on hover
    chart = browser.find_elements("css selector", "svg.chart")[0]
    assert re.search(r"recall \d\.\d{4}, precision \d\.\d{4}\nthreshold \d+", hover_tip(browser, chart))
    screenshot(browser, tmp_path / "results.png", "results-page.png")


# --------------------------------------------------------------------------------------------
# The run page
# --------------------------------------------------------------------------------------------


def _sample(key: str, side: int, seed: int) -> Sample:
    rgb, mask = scene(side, side + 8, seed)
    pred = _noisy(mask, seed, 0.7)
    return Sample(key, rgb, mask, pred, dict(zip(PER_IMAGE_METRICS, (0.1, 0.8, 0.9, 0.7), strict=True)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as a run leaves it: metrics.jsonl (train and val rows of two sets) and plots/latest.npz."""
    run = tmp_path_factory.mktemp("run") / "demo"
    run.mkdir()
    log = MetricsFile(run)
    for step in range(1, 9):
        log.append({"kind": "train", "step": step, "lr": 0.01, "loss": 1 / step, "bce": 0.5 / step, "elapsed_s": step})
        if step % 4 == 0:
            log.append(
                {
                    "kind": "val",
                    "step": step,
                    **{f"{s}/{m}": 0.5 + step / (20 + i) for i, s in enumerate(("A", "B<i>")) for m in ("maxF", "MAE")},
                }
            )
    thresholds = list(range(255, -1, -1))
    curves = {
        "threshold": thresholds,
        "precision": [0.5 + t / 600 for t in thresholds],
        "recall": [1 - t / 255 for t in thresholds],
        "F": [0.6] * 256,
        "E": [0.7] * 256,
    }
    details = {
        name: SetDetails(
            curves,
            {"k0": dict.fromkeys(PER_IMAGE_METRICS, 0.1)},
            [_sample(f"k{i}", 40, i) for i in range(3)],
            [_sample("w", 40, 9)],
        )
        for name in ("A", "B<i>")
    }
    plots.save_latest(run / "plots" / plots.LATEST, 8, details)
    return run


def test_report_html_writes_the_run_page(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        report_main([str(run_dir), "--no-plots", "--html"])
    out = capsys.readouterr().out
    page = run_dir / "report" / "index.html"
    assert e.value.code == 0 and f"page: {page}" in out.splitlines()
    text = page.read_text()
    assert "Validation history" in text and "training loss" in text and "Latest validation (step 8)" in text
    assert "B&lt;i&gt;" in text and "B<i>" not in text
    assert len(list((run_dir / "report" / "pictures").glob("*/*/thumbs/*.png"))) == 2 * 4 * 3


def test_run_page_in_chromium(browser, run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        report_main([str(run_dir), "--no-plots", "--html"])
    capsys.readouterr()
    browser.get((run_dir / "report" / "index.html").as_uri())
    images = check_loaded_offline(browser)
    assert len(images) == 2 * 4 * 3
    charts = browser.find_elements("css selector", "svg.chart")
    titles = [c.get_attribute("aria-label") for c in charts]
    assert titles[:2] == ["maxF", "MAE"] and "training loss" in titles and "A: precision-recall" in titles
    assert [p.get_attribute("data-name") for p in charts[0].find_elements("css selector", "polyline")] == ["A", "B<i>"]
    assert re.search(r"step \d+, maxF \d\.\d{4}", hover_tip(browser, charts[0]))
    screenshot(browser, tmp_path / "run.png", "run-page.png")


def test_sweep_page_in_chromium(browser, tmp_path):
    """The sweep's page (report --sweep writes it from salnet.sweep's table): every cell, sortable; a
    lower-is-better column sorts smallest first, a name is text."""
    header = ["cell", "optim.lr", "state", "steps", "best val/maxF", "best val/MAE"]
    rows = [
        ["lr1e-3", "1e-3", "done", "8/8", 0.91, 0.05],
        ["lr3e-3<b>", "3e-3", "done", "8/8", 0.93, 0.07],
        ["lr1e-2", "1e-2", "failed", "3/8", None, None],
    ]
    page = write_sweep_page(tmp_path, header, rows, "val/maxF")
    browser.get(page.as_uri())
    check_loaded_offline(browser)
    table = browser.find_element("css selector", "table.sweep")
    assert column(table, 0) == ["lr1e-3", "lr3e-3<b>", "lr1e-2"]
    table.find_elements("css selector", "thead th")[5].click()  # best val/MAE: smallest first, no value last
    assert column(table, 0) == ["lr1e-3", "lr3e-3<b>", "lr1e-2"]
    table.find_elements("css selector", "thead th")[4].click()  # best val/maxF: largest first
    assert column(table, 0) == ["lr3e-3<b>", "lr1e-3", "lr1e-2"]
    table.find_elements("css selector", "thead th")[4].click()  # again: reversed, no value still last
    assert column(table, 0) == ["lr1e-3", "lr3e-3<b>", "lr1e-2"]
