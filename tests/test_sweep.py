"""Sweeps (salnet.sweep, launch/submit.py --sweep, the sweep table of salnet.report --sweep).

Without a cluster: cell names, the product, sweep files, --dry-run, and the bad input refused before
anything is submitted. On the local Slurm cluster (slurm/local/up.sh): the acceptance 2x2 sweep as one
job array, one task sent USR2 mid-run (it alone is requeued and resumes bitwise), the table, and a
second submit that skips every finished cell.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster as sc
import yaml

from salnet.sweep import SweepError, build_cells, parse_sweep_arg, read_sweep_file, split_values
from salnet.sweep_report import sweep_table

from conftest import REPO, corrupt_last_val_image

SUBMIT = REPO / "launch" / "submit.py"
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
CPU_TASK = ["--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--signal-delay", "60"]
STEPS = 12  # validation and checkpoints at 6 and 12
GRID = ["--sweep", "optim.lr=1e-3,3e-3", "--sweep", "loss.kind=bce_iou,structure"]
CELLS = ["lr1e-3-kind_bce_iou", "lr1e-3-kind_structure", "lr3e-3-kind_bce_iou", "lr3e-3-kind_structure"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny synthetic shards (the real CLI) and a tiny run config; runs go to work/runs."""
    root = tmp_path_factory.mktemp("sweep")
    subprocess.run(
        [sys.executable, "-m", "salnet.shards", "synth", str(root / "shards"), "--train", "32", "--val", "8"]
        + ["--size", "64"],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=REPO,
    )
    # no loader workers, narrower decoder: four cells share two nodes' CPUs
    sc.write_run_config(root, "grid", STEPS, data={"workers": 0}, model={"ppm_width": 16, "fpn_width": 16})
    return root


def submit(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SUBMIT), *args, "--config", str(root / "grid.yaml")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **ENV, **(env or {})},
    )


# --------------------------------------------------------------------------------------------
# Without a cluster
# --------------------------------------------------------------------------------------------


def test_cells_are_the_product_in_order_with_plain_unique_names():
    cells = build_cells(
        {"optim.lr": ["1e-3", 0.01], "loss.kind": ["bce_iou", "structure"], "eval.every": [50]},
        [{"checkpoint.every": 7, "data.multiscale": [320, 352]}, {"log.project": "a b/c"}],
    )
    assert [c.name for c in cells] == [
        "lr1e-3-kind_bce_iou-eval_every50",
        "lr1e-3-kind_structure-eval_every50",
        "lr0.01-kind_bce_iou-eval_every50",
        "lr0.01-kind_structure-eval_every50",
        "checkpoint_every7-multiscale320_352",  # two keys end in 'every': each says whose
        "project_a_b_c",  # only letters, digits, '.', '+', '_', '-' in a name
    ]
    assert cells[2].values == {"optim.lr": 0.01, "loss.kind": "bce_iou", "eval.every": 50}
    # The overrides read back as the values (salnet.train's key=value parsing).
    assert cells[0].overrides() == ["optim.lr=1e-3", "loss.kind=bce_iou", "eval.every=50"]
    assert cells[4].overrides() == ["checkpoint.every=7", "data.multiscale=[320, 352]"]


def test_sweep_values_parse_as_overrides_do():
    assert split_values("[320,352],[288, 320],'a,b'") == ["[320,352]", "[288, 320]", "'a,b'"]
    assert parse_sweep_arg("optim.lr=1e-3,0.01,true") == ("optim.lr", ["1e-3", 0.01, True])
    assert parse_sweep_arg("data.multiscale=[320,352],[288]") == ("data.multiscale", [[320, 352], [288]])


def test_sweep_file_grid_and_cells(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: lr-loss\ngrid:\n  optim.lr: [0.001, 0.003]\ncells:\n  - {optim.lr: 0.01, loss.kind: structure}\n"
    )
    name, grid, cells = read_sweep_file(path)
    assert (name, grid, cells) == (
        "lr-loss",
        {"optim.lr": [0.001, 0.003]},
        [{"optim.lr": 0.01, "loss.kind": "structure"}],
    )
    assert [c.name for c in build_cells(grid, cells)] == ["lr0.001", "lr0.003", "lr0.01-kind_structure"]
    for text, expect in [
        ("grid: {optim.lr: 0.1}\n", "grid: optim.lr: expected a non-empty list of values, got 0.1"),
        ("grid: {optim.lrr: [1]}\n", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("cells: [{}]\n", "cells: must be a list of non-empty key -> value mappings"),
        ("sweeps: {}\n", "got the keys sweeps"),
    ]:
        path.write_text(text)
        with pytest.raises(SweepError, match=re.escape(expect)):
            read_sweep_file(path)


def test_dry_run_prints_the_cells_the_array_and_each_resolved_config_and_writes_nothing(work):
    proc = submit(work, "--dry-run", *GRID, "--max-parallel", "3", *CPU_TASK)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"sweep grid: 4 cell(s) in {work}/runs/grid; 4 to submit" in out
    for name, values in zip(
        CELLS,
        ["optim.lr=1e-3 loss.kind=bce_iou", "optim.lr=1e-3 loss.kind=structure"]
        + ["optim.lr=3e-3 loss.kind=bce_iou", "optim.lr=3e-3 loss.kind=structure"],
        strict=True,
    ):
        assert re.search(rf"^  {name} +{values} +unsubmitted +step 0: starts from step 0", out, re.M), out
    script = out.split("# ---- sbatch script", 1)[1].split("# ---- cell", 1)[0]
    assert "#SBATCH --array=0-3%3" in script and "dependency" not in script
    assert re.search(r"^#SBATCH --job-name=salnet-sweep-grid-[0-9a-f]{6}$", script, re.M)
    assert f"#SBATCH --output={work}/runs/grid/slurm/%A_%a_0_log.out" in script
    configs = {
        m.group(1): yaml.safe_load(m.group(2))
        for m in re.finditer(r"^# ---- cell (\S+): resolved config -+\n(.*?)(?=^# ---- |\Z)", out, re.M | re.S)
    }
    assert list(configs) == CELLS
    last = configs["lr3e-3-kind_structure"]
    assert last["name"] == "lr3e-3-kind_structure" and last["out_dir"] == str(work / "runs" / "grid")
    assert last["optim"]["lr"] == 3e-3 and last["loss"]["kind"] == "structure"
    assert last["log"]["group"] == "grid"  # every cell in the sweep's W&B group
    assert last["data"]["train"] == [str(work / "shards" / "train")]
    assert not (work / "runs").exists()


@pytest.mark.parametrize("case", ["unknown-key", "empty-values", "collision", "too-many", "bad-value", "run-dir"])
def test_bad_sweeps_are_refused_before_submitting(work, case):
    args = {
        "unknown-key": (
            ["--sweep", "optim.lrr=1,2"],
            ["--sweep 'optim.lrr=1,2': unknown key 'optim.lrr'", "'optim.lr'"],
        ),
        "empty-values": (["--sweep", "optim.lr="], ["--sweep 'optim.lr='", "empty value"]),
        "collision": (
            ["--sweep", "log.project=a/b,a_b"],
            ["two cells would be named 'project_a_b'", "[log.project=a/b] and [log.project=a_b]"],
        ),
        "too-many": (
            ["--sweep", "train.seed=" + ",".join(map(str, range(1001)))],
            ["1001 cells (1001 from the grid): more than 1000; add --yes"],
        ),
        "bad-value": (  # the cell is named, and the key with the values that would be valid
            ["--sweep", "loss.kind=structure,bce"],
            ["cell kind_bce [loss.kind=bce]", "'loss.kind'", "'bce_iou', 'structure' or 'dice'"],
        ),
        "run-dir": (["--sweep", "name=a,b"], ["'name' cannot be swept"]),
    }
    argv, expect = args[case]
    # No cluster to reach: should a check fail to refuse, sbatch fails instead of queueing the cells.
    proc = submit(work, *argv, *CPU_TASK, env={"SLURM_CONF": str(work / "no-cluster" / "slurm.conf")})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for text in expect:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr}"
    assert not (work / "runs").exists()  # nothing written, nothing submitted


# --------------------------------------------------------------------------------------------
# On the cluster
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with sc.module_cluster(2) as submitted:  # 2 nodes x 2 CPUs: the 4 cells at once
        yield submitted


def submitted_tasks(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """{cell: ARRAYJOB_TASK (or JOB for a one-cell sweep)} as launch/submit.py prints them."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {m.group(2): m.group(1) for m in re.finditer(r"^  (\d+(?:_\d+)?) +(\S+)$", proc.stdout, re.M)}


def records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def task_logs(sweep_dir: Path, task: str) -> str:
    """The task's logs, whole (every attempt appends to them), stdout before stderr."""
    return "\n".join(
        f"----- {p.name}\n{p.read_text(errors='replace')}"
        for p in sorted((sweep_dir / "slurm").glob(f"{task}_*_log.*"), key=lambda p: p.suffix != ".out")
    )


def wait_all_gone(tasks: list[str], timeout: float = 240) -> None:
    start = time.monotonic()
    while any(sc.squeue_state(t) for t in tasks):
        if time.monotonic() - start > timeout:
            pytest.fail(f"still queued after {timeout:.0f} s: {[(t, sc.squeue_reason(t)) for t in tasks]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_a_2x2_sweep_survives_usr2_to_one_task_and_is_reported_and_skipped_when_resubmitted(cluster, work):
    import torch

    proc = submit(work, *GRID, "--max-parallel", "4", *CPU_TASK)
    tasks = submitted_tasks(proc)
    cluster.extend(tasks.values())
    # Another sweep beside it (a sweep file of explicit cells): the uninterrupted twin of the cell that
    # gets USR2, and a cell whose last val image is corrupt (it fails at its first validation).
    bad_key = corrupt_last_val_image(work / "shards" / "val", work / "bad" / "val")
    (work / "twin.yaml").write_text(
        "name: twin\ncells:\n  - {optim.lr: 1e-3, loss.kind: structure}\n"
        "  - {optim.lr: 1e-3, loss.kind: structure, data.val: [bad/val]}\n"
    )
    twin_tasks = submitted_tasks(submit(work, "--sweep-file", "twin.yaml", *CPU_TASK))
    assert list(twin_tasks) == ["lr1e-3-kind_structure", "lr1e-3-kind_structure-val_bad_val"]
    crash_task = twin_tasks["lr1e-3-kind_structure-val_bad_val"]
    cluster.extend(twin_tasks.values())
    assert list(tasks) == CELLS and len({t.split("_")[0] for t in tasks.values()}) == 1  # one array
    sweep_dir, signalled = work / "runs" / "grid", "lr1e-3-kind_structure"
    task = tasks[signalled]
    start = time.monotonic()
    while not records(sweep_dir / signalled, "train"):
        if not sc.squeue_state(task) or time.monotonic() - start > 180:
            pytest.fail(f"task {task} did not train:\n{task_logs(sweep_dir, task)}")
        time.sleep(0.1)
    sc.scancel("--signal=USR2", task)
    wait_all_gone([*tasks.values(), *twin_tasks.values()])
    log = task_logs(sweep_dir, task)
    # That task alone stopped, saved, and was requeued as ARRAYJOB_TASK; it resumed and finished.
    step = int(re.search(r"stopped at step (\d+) on SIGUSR2", log).group(1))
    assert step < STEPS and f"requeued job {task} (restart 1 of at most" in log, log
    assert f"resumed from {sweep_dir / signalled}/checkpoints/step-{step:08d} at step {step}" in log, log
    for name, t in tasks.items():
        assert sc.show_job(t).get("Restarts", "0") == ("1" if name == signalled else "0"), task_logs(sweep_dir, t)
        assert [r["step"] for r in records(sweep_dir / name, "train")] == list(range(1, STEPS + 1)), name
    # Its final validation and weights equal the uninterrupted run's, bitwise.
    twin = work / "runs" / "twin" / signalled
    assert records(twin, "val")[-1] == records(sweep_dir / signalled, "val")[-1]
    final = f"checkpoints/step-{STEPS:08d}/state.pt"
    a = torch.load(twin / final, weights_only=True, map_location="cpu")["model"]
    b = torch.load(sweep_dir / signalled / final, weights_only=True, map_location="cpu")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The crashed cell ended only itself: its task failed, the others finished (above); the table says
    # failed, and a second submit of that sweep would submit it again (its twin is done: skipped).
    twin_dir = work / "runs" / "twin"
    assert bad_key in task_logs(twin_dir, crash_task) and sc.show_job(crash_task).get("JobState") == "FAILED"
    header, rows, _ = sweep_table(twin_dir)
    assert [r[header.index("state")] for r in rows] == ["done", "failed"]
    again = submit(work, "--sweep-file", "twin.yaml", "--dry-run", *CPU_TASK)
    assert "2 cell(s) in" in again.stdout and "; 1 to submit" in again.stdout, again.stdout + again.stderr
    assert re.search(r"^  lr1e-3-kind_structure-val_bad_val .* failed +step 6: starts from step 0", again.stdout, re.M)
    # The table: every cell done, its values and best, best first (maxF: higher first).
    report = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from salnet.sweep_report import sweep_report_main as m; sys.exit(m(sys.argv[1]))",
            sweep_dir,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0 and "4 cell(s): 4 done" in report.stdout, report.stdout + report.stderr
    header, rows, sorted_by = sweep_table(sweep_dir)
    assert header == ["cell", "optim.lr", "loss.kind", "state", "steps", "best val/maxF"] and sorted_by == "val/maxF"
    assert sorted(r[0] for r in rows) == CELLS and all(r[3] == "done" and r[4] == f"{STEPS}/{STEPS}" for r in rows)
    bests = [r[5] for r in rows]
    assert bests == sorted(bests, reverse=True)
    for row in rows:
        assert row[5] == max(r["val/maxF"] for r in records(sweep_dir / row[0], "val"))
    header, rows, sorted_by = sweep_table(sweep_dir, "MAE")  # lower is better: smallest first, maxF kept
    assert header[-2:] == ["best val/maxF", "best val/MAE"] and sorted_by == "val/MAE"
    assert [r[6] for r in rows] == sorted(r[6] for r in rows)
    with pytest.raises(SweepError, match="--sort 'Fmax': no cell logged val/Fmax; the cells logged val/MAE, val/S, "):
        sweep_table(sweep_dir, "Fmax")
    assert (sweep_dir / "sweep.csv").read_text().splitlines()[0] == ",".join(header[:-1])
    assert "| lr1e-3-kind_structure | 1e-3 | structure | done |" in (sweep_dir / "sweep.md").read_text()
    page = (sweep_dir / "index.html").read_text()  # the sortable page (tests/test_pages.py opens one in Chromium)
    assert all(f"<td data-v='{c}'>{c}</td>" in page for c in CELLS) and "best val/maxF" in page
    # Submitted again: every cell is done, nothing is submitted.
    again = submit(work, *GRID, "--max-parallel", "4", *CPU_TASK)
    assert again.returncode == 0 and "4 cell(s)" in again.stdout and "nothing to submit" in again.stdout, again.stdout
    assert all(re.search(rf"^  {c} .* done +step {STEPS}: skipped: done$", again.stdout, re.M) for c in CELLS)
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(c["name"], [t["task"] for t in c["tasks"]]) for c in manifest["cells"]] == [(c, [tasks[c]]) for c in CELLS]
