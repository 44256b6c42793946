"""Dashboards (issue 16), read back from what real runs wrote: the offline W&B run (its transaction
log and media files), runs/NAME/plots/, the console. References are computed here, independently:
PySODMetrics on best.pt's predictions, the val images as the shards hold them.

Run as a script, this file is also the probe of Validator's details on N ranks:

    torchrun --nproc_per_node N tests/test_dashboards.py CONFIG.yaml OUT.json
"""

import fcntl
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import records, tiny_config
from test_train_stop import alive, children, wait_for_step

from salnet.config import load_config
from salnet.data import ValStream, to_model_input
from salnet.metrics import is_better
from salnet.model import build_model
from salnet.run.checkpoint import load_best
from salnet.run.rundir import RunDir
from salnet.run.wandb_run import transaction_log_records
from salnet.shards.synth import synthesize
from salnet.validate import MAX_CELL_SIDE, best_key, cell_size, panel_rank, probabilities_at

from conftest import REPO, Forked, forked_run, free_port, ranks

pytestmark = pytest.mark.slow  # every test here starts training runs or torchrun groups

PANEL, WORST = 4, 3
WANDB_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train, a = synthesize(root / "demo", train=64, val=20, size=64, seed=3)
    _, b = synthesize(root / "other", train=1, val=13, size=48, seed=9)  # masks smaller than eval_size
    return {"train": train, "val": a, "B": b}


def dash_config(tmp_path, shards, **sections):
    sections.setdefault("data", {})["val"] = {"A": [str(shards["val"])], "B": [str(shards["B"])]}
    log = {"every": 1, "wandb": True, "panel_images": PANEL, "worst_images": WORST, **sections.pop("log", {})}
    return tiny_config(tmp_path, shards, log=log, **sections)


def wandb_env(tmp_path, **extra):
    # W&B stages artifact files (and tables' images) under its data dir: keep them in the test's tree.
    return {
        **WANDB_ENV,
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        **extra,
    }


# --------------------------------------------------------------------------------------------
# Reading an offline W&B run back
# --------------------------------------------------------------------------------------------


def _items(items):
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


class OfflineRun:
    """One runs/NAME/wandb/offline-run-DATE-ID directory, folded the way W&B folds it."""

    def __init__(self, directory: Path):
        self.dir, self.id = directory, directory.name.rsplit("-", 1)[-1]
        self.history, self.summary, self.config, self.metrics, self.artifacts, self.run = [], {}, {}, [], [], None
        for record in transaction_log_records(next(directory.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
                self.config.update(_items(record.run.config.update))
            elif kind == "config":
                self.config.update(_items(record.config.update))
            elif kind == "history":
                self.history.append(_items(record.history.item))
            elif kind == "summary":
                self.summary.update(_items(record.summary.update))
            elif kind == "metric":
                self.metrics.append(record.metric)
            elif kind == "artifact":
                self.artifacts.append(record.artifact)

    def steps_of(self, key):
        return [row["trainer/step"] for row in self.history if key in row]

    def row(self, key, step):
        [row] = [r for r in self.history if key in r and r["trainer/step"] == step]
        return row

    def media(self, relative):
        return self.dir / "files" / relative

    def artifact_file(self, client_id, path):
        """A file of a logged artifact (offline, W&B keeps it in its staging area until a sync)."""
        [artifact] = [a for a in self.artifacts if a.client_id == client_id]
        [entry] = [e for e in artifact.manifest.contents if e.path == path]
        return Path(entry.local_path)


def offline_runs(run_dir):
    return [OfflineRun(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


def history_is_one_timeline(runs):
    """{key: steps} over every attempt; each key at each trainer/step at most once."""
    steps: dict[str, list[int]] = {}
    for run in runs:
        for row in run.history:
            for key in row:
                if not key.startswith("_") and key != "trainer/step":
                    steps.setdefault(key, []).append(row["trainer/step"])
    for key, values in steps.items():
        assert len(values) == len(set(values)), f"{key} logged twice at a step: {sorted(values)}"
    return {key: sorted(values) for key, values in steps.items()}


# --------------------------------------------------------------------------------------------
# The references: best.pt's predictions, computed here in one process
# --------------------------------------------------------------------------------------------


def reference_predictions(run_dir, best):
    """{set: {key: (image [S, S, 3] uint8, mask [H, W] uint8, probabilities [H, W] float32)}}."""
    torch.set_num_threads(1)  # the run used one thread per rank: same kernels, same floats
    cfg = load_config(str(run_dir / "config.yaml"))
    model = build_model(cfg.model)
    model.load_state_dict(best["model"])
    model.eval().to(memory_format=torch.channels_last)
    out = {}
    for name, sources in cfg.data.val_sets.items():
        out[name] = {}
        for batch in ValStream(cfg.data.model_copy(update={"val": sources}), rank=0, world_size=1):
            with torch.no_grad():
                logits = model(to_model_input(batch["image"], torch.device("cpu"), channels_last=True))
            preds = probabilities_at(logits, [tuple(m.shape) for m in batch["masks"]])
            for key, image, mask, pred in zip(batch["key"], batch["image"], batch["masks"], preds):
                out[name][key] = (image.permute(1, 2, 0).numpy(), mask.numpy(), pred.numpy())
    return out


def as_png(pred):
    return (pred * 255).astype(np.uint8)  # an 8-bit map, as PySODMetrics reads predictions


def reference_mae(mask, pred):
    from py_sod_metrics import MAE

    m = MAE()
    m.step(pred=as_png(pred), gt=mask)
    return float(m.get_results()["mae"])


def reference_curves(samples):
    from py_sod_metrics import Fmeasure

    f = Fmeasure()
    for _, mask, pred in samples.values():
        f.step(pred=as_png(pred), gt=mask)
    r = f.get_results()
    return {"precision": r["pr"]["p"], "recall": r["pr"]["r"], "F": r["fm"]["curve"]}


def resized(picture, size):
    """Independent of salnet's resizing: PIL's bilinear filter (antialiased when shrinking)."""
    if picture.shape[:2] == size:
        return picture
    return np.asarray(Image.fromarray(picture).resize((size[1], size[0]), Image.BILINEAR))


def assert_triptych_shows(cells, sample, eval_size):
    """`cells` (image, ground truth, prediction as uint8 pictures) show `sample`'s image, mask and
    prediction at the mask's aspect."""
    image, mask, pred = sample
    size = cell_size(*mask.shape, min(eval_size, MAX_CELL_SIDE))
    sources = (image, mask, np.round(pred * 255).astype(np.uint8))
    for what, got, source in zip(("image", "ground truth", "prediction"), cells, sources):
        want = resized(source, size)
        got = got[..., 0] if want.ndim == 2 and got.ndim == 3 else got
        assert got.shape == want.shape, what
        diff = np.abs(got.astype(int) - want.astype(int))
        # The same pixels where nothing is resized (a level off at most: the prediction's rounding);
        # PIL's filter differs from torch's by a level or two on average.
        exact = source.shape[:2] == size
        assert diff.mean() < (0.01 if exact else 2.0) and diff.max() <= (1 if exact else 40), (
            what,
            diff.mean(),
            diff.max(),
        )


def split_triptych(picture):
    """The three cells of a one-row panel (image | ground truth | prediction, 4 px gutters)."""
    width = (picture.shape[1] - 8) // 3
    return [picture[:, i * (width + 4) : i * (width + 4) + width] for i in range(3)]


def png(path):
    return np.asarray(Image.open(path))


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def test_offline_wandb_run_holds_panels_worst_tables_curves_summary_and_config(tmp_path, shards):
    path, run_dir = dash_config(tmp_path, shards, name="dash", log={"artifacts": True, "plots": True})
    secret = "0123456789abcdef0123456789abcdef01234567"
    proc = ranks(
        2, ["-m", "salnet.train", "--config", path], timeout=400, env=wandb_env(tmp_path, WANDB_API_KEY=secret)
    )
    assert secret not in proc.stdout + proc.stderr
    [run] = offline_runs(run_dir)
    best = load_best(RunDir(run_dir).best)
    cfg = load_config(str(run_dir / "config.yaml"))
    vals = records(run_dir, "val")

    # One timeline against trainer/step: every train value at steps 1..6 once, val values at 3 and 6.
    assert any(m.name == "trainer/step" for m in run.metrics)
    assert any(m.glob_name == "*" and m.step_metric == "trainer/step" for m in run.metrics)
    timeline = history_is_one_timeline([run])
    assert timeline["train/loss"] == [1, 2, 3, 4, 5, 6] and timeline["val/A/maxF"] == [3, 6]
    for val in vals:
        for key, value in val.items():
            if key not in ("kind", "step"):
                assert run.row(f"val/{key}", val["step"])[f"val/{key}"] == value, key  # every scalar metric
    # The run: grouped and tagged by name; its config is the resolved config, world size and global batch.
    assert run.run.run_group == "dash" and list(run.run.tags) == ["dash"] and run.id == run.run.run_id
    assert run.config["world_size"] == 2 and run.config["global_batch"] == 16
    for section, values in cfg.model_dump(mode="json").items():
        assert run.config[section] == values, section
    # The summary: the best value, its step, the checkpoint.
    assert run.summary["best/metric"] == "maxF" and run.summary["best/step"] == best["step"]
    assert run.summary["best/value"] == best["metrics"][best_key(cfg)] == max(v["mean/maxF"] for v in vals)
    assert run.summary["best/checkpoint"] == str(RunDir(run_dir).best.resolve())

    # At best.pt's step the logged pictures, tables and curves are best.pt's, computed here.
    reference = reference_predictions(run_dir, best)
    step = best["step"]
    for name, samples in reference.items():
        row = run.row(f"val/{name}/panel/filenames", step)
        # The panel: the same images at every validation, the first by panel_rank.
        expected_keys = sorted(samples, key=lambda k: (panel_rank(k), k))[:PANEL]
        assert row[f"val/{name}/panel/captions"] == expected_keys
        assert all(
            run.row(f"val/{name}/panel/captions", s)[f"val/{name}/panel/captions"] == expected_keys for s in (3, 6)
        )
        for key, filename in zip(expected_keys, row[f"val/{name}/panel/filenames"]):
            assert_triptych_shows(split_triptych(png(run.media(filename))), samples[key], cfg.data.eval_size)
        # The worst table: the K largest per-image MAE (PySODMetrics'), worst first, with their pictures.
        maes = {key: reference_mae(mask, pred) for key, (_, mask, pred) in samples.items()}
        worst = sorted(maes, key=maes.get, reverse=True)[:WORST]
        table = json.loads(run.media(row[f"val/{name}/worst/path"]).read_text())
        assert table["columns"][:2] == ["key", "MAE"] and table["columns"][-3:] == [
            "image",
            "ground truth",
            "prediction",
        ]
        assert [r[0] for r in table["data"]] == worst
        assert [r[1] for r in table["data"]] == pytest.approx([maes[k] for k in worst], abs=1e-9)
        client_id = row[f"val/{name}/worst/artifact_path"].split("://")[1].split("/")[0]
        full = json.loads(run.artifact_file(client_id, f"val/{name}/worst.table.json").read_text())
        for data_row in full["data"]:
            cells = [png(run.artifact_file(client_id, cell["path"])) for cell in data_row[-3:]]
            assert_triptych_shows(cells, samples[data_row[0]], cfg.data.eval_size)
        # The curves: one table, points equal to PySODMetrics' mean curves, point i at threshold 255 - i.
        curves = json.loads(run.media(row[f"val/{name}/pr_table/path"]).read_text())
        assert row[f"val/{name}/f_threshold_table/path"] == row[f"val/{name}/pr_table/path"]
        columns = {c: [r[i] for r in curves["data"]] for i, c in enumerate(curves["columns"])}
        assert columns["threshold"] == list(range(255, -1, -1))
        for curve, values in reference_curves(samples).items():
            assert columns[curve] == pytest.approx(values.tolist(), abs=1e-9), curve

    # best.pt as a model artifact, aliased best and latest, once per improvement; the last is best.pt.
    models = [a for a in run.artifacts if a.type == "model"]
    improvements = sum(
        is_better("maxF", v["mean/maxF"], max([u["mean/maxF"] for u in vals[:i]], default=None))
        for i, v in enumerate(vals)
    )
    assert len(models) == improvements and all({"best", "latest"} <= set(a.aliases) for a in models)
    assert models[-1].name == "dash-best"
    [entry] = models[-1].manifest.contents
    assert (
        hashlib.sha256(Path(entry.local_path).read_bytes()).digest()
        == hashlib.sha256(RunDir(run_dir).best.read_bytes()).digest()
    )

    # plots/: the latest validation's panel is the one W&B got at step 6, row for row.
    for name in reference:
        local = png(run_dir / "plots" / f"panel_{name}.png")
        top = 0
        for filename in run.row(f"val/{name}/panel/filenames", 6)[f"val/{name}/panel/filenames"]:
            logged = png(run.media(filename))
            assert np.array_equal(local[top : top + logged.shape[0], : logged.shape[1]], logged)
            top += logged.shape[0] + 4
        assert top - 4 == local.shape[0]

    # Console in a job log: plain train lines with elapsed time and ETA, no progress bar.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and all(" elapsed=0:" in line and " eta=0:" in line for line in lines)
    assert lines[-1].endswith("eta=0:00:00") and "\r" not in proc.stdout


def test_killed_and_resumed_runs_log_each_step_once_to_one_wandb_run(tmp_path, shards):
    path, run_dir = dash_config(tmp_path, shards, train={"steps": 8}, eval={"every": 4}, checkpoint={"every": 4})
    env = wandb_env(tmp_path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # 1: killed (SIGKILL: no save, no goodbye to W&B) after step 6, so it resumes at the step-4 checkpoint.
    job = Forked(["-m", "salnet.train", "--config", path], env=env)
    wait_for_step(run_dir, 6, [job])
    kill_once_wandb_has_rows(job, run_dir)
    # 2: resumes at step 4 and finishes.
    assert "at step 4" in forked_run(["-m", "salnet.train", "--config", path], env=env, timeout=400).stdout
    # 3: the final checkpoint lost: resumes at step 4 again and repeats steps W&B already has.
    shutil.rmtree(run_dir / "checkpoints" / "step-00000008")
    assert "at step 4" in forked_run(["-m", "salnet.train", "--config", path], env=env, timeout=400).stdout

    runs = offline_runs(run_dir)
    state = torch.load(run_dir / "checkpoints" / "step-00000008" / "state.pt", weights_only=True)
    assert len(runs) == 3 and {r.id for r in runs} == {state["client"]["train"]["wandb_id"]}
    killed, finished, repeated = (run.steps_of("train/loss") for run in runs)
    # What the killed job got into W&B is a prefix of its steps (its last rows may never have left
    # wandb-core, though metrics.jsonl had them); the next attempt logs from there on, not from step 5,
    # and gives W&B the rows up to its checkpoint that W&B lacks from metrics.jsonl.
    assert killed == list(range(1, len(killed) + 1)) and len(killed) >= 1
    assert finished == list(range(len(killed) + 1, 9))
    assert repeated == [] and runs[2].steps_of("val/A/maxF") == []
    timeline = history_is_one_timeline(runs)  # nothing twice ...
    assert timeline["train/loss"] == list(range(1, 9))  # ... and nothing missing
    assert timeline["val/A/maxF"] == timeline["val/B/MAE"] == [4, 8]
    assert (
        8 in timeline["val/B/panel/filenames"]
    )  # (a lost step's pictures are lost: only metrics.jsonl's numbers come back)
    values = {(row["trainer/step"], key): value for run in runs for row in run.history for key, value in row.items()}
    clocks = {
        "kind",
        "step",
        "images_per_s",
        "data_wait",
        "peak_mem_mib",
        "elapsed_s",
        "eta_s",
    }  # differ between attempts
    for r in records(run_dir, "train") + records(run_dir, "val"):  # the rest is the same in W&B, by exact resume
        for key, value in r.items():
            if key not in clocks:
                assert values[(r["step"], f"{r['kind']}/{key}")] == value, (r["step"], key)
    # metrics.jsonl reads as one run too
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 9))

    # Starting over (train.resume=none) into the same W&B run: that is new data, logged in full.
    run_id = runs[0].id
    forked_run(
        ["-m", "salnet.train", "--config", path, "train.resume=none", f"log.wandb_id={run_id}", "train.steps=4"],
        env=env,
        timeout=400,
    )
    again = offline_runs(run_dir)[-1]
    assert again.id == run_id and again.steps_of("train/loss") == [1, 2, 3, 4] and again.steps_of("val/A/maxF") == [4]


def wandb_core_of(pid):
    for child in children(pid):
        try:
            if b"wandb-core" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            pass
    return None


def kill_once_wandb_has_rows(job, run_dir, timeout=120):
    """SIGKILL `job` (no save, no goodbye to W&B) once its W&B transaction log holds train rows, and
    return when its orphaned wandb-core has gone. Conditions, not sleeps: wandb-core writes what it is
    sent in its own time (a busy machine delays it), and a W&B run without rows of the killed attempt
    would leave nothing for the next one to continue; a wandb-core still writing after the kill would
    race the next attempt, which reads those rows to know where W&B stands."""
    core = wandb_core_of(job.pid)
    assert core is not None
    job.send_signal(signal.SIGSTOP)  # frozen at this step (it cannot reach its next checkpoint) ...
    deadline = time.monotonic() + timeout
    while not logged_steps(run_dir, "train/loss"):  # ... while wandb-core writes what it was sent
        assert time.monotonic() < deadline, f"W&B got no train rows within {timeout} s"
        time.sleep(0.1)
    job.kill()
    job.communicate(timeout=60)
    while alive(core):
        assert time.monotonic() < deadline, f"the orphaned wandb-core (pid {core}) outlived its parent by {timeout} s"
        time.sleep(0.05)


def logged_steps(run_dir, key):
    """The steps of `key` in the first W&B transaction log of `run_dir` so far ([] before it has any)."""
    try:
        return offline_runs(run_dir)[0].steps_of(key)
    except (IndexError, StopIteration, ValueError):  # no run directory, no transaction log, or no header yet
        return []


def test_training_outlives_a_killed_wandb_core(tmp_path, shards):
    path, run_dir = dash_config(tmp_path, shards, train={"steps": 6}, log={"plots": True})
    job = Forked(["-m", "salnet.train", "--config", path], env=wandb_env(tmp_path))
    wait_for_step(run_dir, 2, [job])
    core = wandb_core_of(job.pid)
    assert core is not None
    os.kill(core, signal.SIGKILL)
    out, err = job.communicate(timeout=400)
    assert job.returncode == 0, err
    assert (
        "W&B failed while" in err
        and "training goes on without W&B" in err
        and "metrics.jsonl keeps every record" in err
    )
    assert err.count("W&B failed") == 1  # one warning, then W&B is off
    assert "Traceback" not in err and "Exception ignored" not in err
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 7))
    assert [r["step"] for r in records(run_dir, "val")] == [3, 6]
    assert (run_dir / "plots" / "panel_A.png").exists() and "done: 6 steps" in out


def test_an_unreachable_wandb_server_costs_a_warning_not_the_run(tmp_path, shards):
    path, run_dir = dash_config(tmp_path, shards, train={"steps": 3}, log={"wandb_timeout_s": 3})
    secret = "fedcba9876543210fedcba9876543210fedcba98"
    env = wandb_env(
        tmp_path, WANDB_MODE="online", WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}", WANDB_API_KEY=secret
    )
    start = time.monotonic()
    proc = forked_run(["-m", "salnet.train", "--config", path], env=env, timeout=400)
    assert secret not in proc.stdout + proc.stderr
    assert "W&B failed while starting the run" in proc.stderr and "metrics.jsonl keeps every record" in proc.stderr
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3] and records(run_dir, "val")
    # The id is kept all the same, so a later attempt that reaches W&B continues one run.
    state = torch.load(run_dir / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    assert state["client"]["train"]["wandb_id"]
    assert time.monotonic() - start < 300


def test_a_terminal_gets_a_progress_bar_over_the_steps(tmp_path, shards):
    path, run_dir = dash_config(
        tmp_path, shards, train={"steps": 4}, eval={"every": 4}, log={"every": 2, "wandb": False}
    )
    main, child = os.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # a 150-column terminal
    proc = subprocess.Popen(
        [sys.executable, "-m", "salnet.train", "--config", str(path)],
        cwd=REPO,
        stdout=child,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(timeout=400) == 0, proc.stderr.read()
    out = b"".join(chunks).decode(errors="replace")
    frames = [frame for line in out.split("\r\n") for frame in line.split("\r") if frame.startswith("train:")]
    assert frames and frames[-1].startswith("train: 100%") and "4/4" in frames[-1]  # the bar, redrawn in place
    assert "step 2/4" in out and "step 4/4" in out and "validation @ step 4" in out  # lines above it


def test_validator_details_do_not_depend_on_the_world_size(tmp_path, shards):
    path, _ = dash_config(tmp_path, shards)
    results = []
    for world in (1, 2):
        out = tmp_path / f"details{world}.json"
        if world == 1:
            forked_run([Path(__file__), path, out], timeout=200)
        else:
            ranks(world, [Path(__file__), path, out], timeout=300)
        results.append(json.loads(out.read_text()))
    one, two = results
    assert one["scores"] == pytest.approx(two["scores"], abs=1e-9)
    for name, d in one["sets"].items():
        other = two["sets"][name]
        assert len(d["per_image"]) == d["images"] == one["scores"][f"{name}/images"]
        # every image's MAE once, whose mean is the set's MAE (the same histograms as SODMetrics)
        assert np.mean([m["MAE"] for m in d["per_image"].values()]) == pytest.approx(
            one["scores"][f"{name}/MAE"], abs=1e-12
        )
        assert np.mean([m["S"] for m in d["per_image"].values()]) == pytest.approx(
            one["scores"][f"{name}/S"], abs=1e-12
        )
        for key, metrics in d["per_image"].items():
            assert metrics == pytest.approx(other["per_image"][key], abs=1e-9), key
        assert d["panel"] == other["panel"] == sorted(d["per_image"], key=lambda k: (panel_rank(k), k))[:PANEL]
        assert d["worst"] == other["worst"] == sorted(d["per_image"], key=lambda k: -d["per_image"][k]["MAE"])[:WORST]
        for curve, values in d["curves"].items():
            assert values == pytest.approx(other["curves"][curve], abs=1e-12), curve
        assert len(d["pictures"]) == PANEL + WORST
        for sample, other_sample in zip(d["pictures"], other["pictures"]):
            for a, b in zip(sample, other_sample):  # image, ground truth, prediction
                assert np.abs(np.array(a, dtype=int) - np.array(b, dtype=int)).max() <= 1


def probe(config_path, out_path):
    """Validator on a random network (same on every rank): rank 0 writes its scores and details."""
    from salnet import dist
    from salnet.strategy.base import predict_logits
    from salnet.validate import Validator

    torch.set_num_threads(1)
    with dist.distributed():
        cfg = load_config(config_path)
        torch.manual_seed(0)
        model = build_model(cfg.model).to(memory_format=torch.channels_last)
        validator = Validator(cfg, dist.rank(), dist.world_size())
        scores = validator(lambda images: predict_logits(model, images))
        if dist.is_main():
            sets = {
                name: {
                    "images": len(d.per_image),
                    "per_image": d.per_image,
                    "curves": d.curves,
                    "panel": [s.key for s in d.panel],
                    "worst": [s.key for s in d.worst],
                    "pictures": [[p.tolist() for p in (s.image, s.gt, s.pred)] for s in d.panel + d.worst],
                }
                for name, d in validator.last_details.items()
            }
            Path(out_path).write_text(json.dumps({"scores": scores, "sets": sets}))


if __name__ == "__main__":
    probe(sys.argv[1], sys.argv[2])
