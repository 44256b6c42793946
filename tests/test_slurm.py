"""Slurm end to end on a real two-node cluster on this machine (slurm/local/up.sh; Debian's Slurm 22.05):
launch/submit.py (Submitit), salnet.slurm, slurm/train.sbatch and the training loop's stop handling.

Every job is 2 nodes x 1 CPU task (gloo), resnet18 at 64 px on 64 synthetic scenes. The cluster is
brought up once (and stopped at the end if this module started it). The tests that need it skip only
where Slurm's binaries are not installed, and say so.
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

from salnet.run.rundir import RunDir

from conftest import REPO, corrupt_last_val_image

SUBMIT = REPO / "launch" / "submit.py"
SBATCH = REPO / "slurm" / "train.sbatch"
CPU_JOB = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--signal-delay", "60"]
STEPS = 16  # the short run: checkpoints and validation at 8 and 16
JOB_TIMEOUT = 240
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

_submitted: list[str] = []


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster():
    # Up with at least 2 nodes (`make test` starts 4: tests/test_multinode.py); stopped at the end only
    # if this started it: another module may share it.
    with sc.module_cluster(min_nodes=2) as jobs:
        yield
        jobs.extend(_submitted)  # cancelled at the end if still queued


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory with tiny synthetic shards (made by the real CLI); runs go to work/runs."""
    root = tmp_path_factory.mktemp("slurm")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "salnet.shards",
            "synth",
            str(root / "shards"),
            "--train",
            "64",
            "--val",
            "16",
            "--size",
            "64",
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=REPO,
    )
    return root


def write_config(root: Path, name: str, **sections) -> Path:
    return sc.write_run_config(root, name, STEPS, **sections)


def submit(root: Path, config: Path, *args: str, check: bool = True, env: dict | None = None):
    proc = subprocess.run(
        [sys.executable, str(SUBMIT), *args, "--config", str(config)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **ENV, **(env or {})},
    )
    if not check:
        return None, proc
    assert proc.returncode == 0, f"submit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    job = re.search(r"^submitted job (\d+)", proc.stdout, re.M).group(1)
    _submitted.append(job)
    return job, proc


def logs(run_dir: Path, job: str) -> str:
    """Every log file of the job (both ranks, stdout and stderr), for failure messages."""
    parts = []
    for path in sorted((run_dir / "slurm").glob(f"{job}_*_log.*")) + sorted(run_dir.parent.glob(f"sbatch-{job}.out")):
        parts.append(f"----- {path.name}\n{path.read_text(errors='replace')[-6000:]}")
    return "\n".join(parts)


def rank0_log(run_dir: Path, job: str) -> str:
    return (run_dir / "slurm" / f"{job}_0_log.out").read_text(errors="replace")


def records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line) if r["kind"] == kind]


def wait_for_step(run_dir: Path, job: str, step: int, timeout: float = JOB_TIMEOUT) -> int:
    """Wait until rank 0 has logged a training step >= `step` (log.every=1); returns it."""
    start = time.monotonic()
    while True:
        done = [r["step"] for r in records(run_dir, "train")]
        if done and max(done) >= step:
            return max(done)
        if not sc.squeue_state(job):
            pytest.fail(f"job {job} ended before step {step}:\n{logs(run_dir, job)}")
        if time.monotonic() - start > timeout:
            pytest.fail(f"job {job} did not reach step {step} in {timeout:.0f} s:\n{logs(run_dir, job)}")
        time.sleep(0.1)


def wait_gone(run_dir: Path, job: str, timeout: float = JOB_TIMEOUT) -> float:
    try:
        return sc.wait_gone(job, timeout)
    except TimeoutError as e:
        subprocess.run(["scancel", job], timeout=30)
        pytest.fail(f"{e}\n{logs(run_dir, job)}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []


def stopped_step(text: str, signal_name: str) -> int:
    m = re.search(rf"stopped at step (\d+) on {signal_name}", text)
    assert m, f"no 'stopped at step N on {signal_name}' in the log:\n{text[-4000:]}"
    return int(m.group(1))


def assert_both_ranks_saved_at(run_dir: Path, step: int) -> None:
    """The checkpoint at `step` is complete and holds both ranks' loader and RNG states."""
    import torch

    state = torch.load(run_dir / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=True, map_location="cpu")
    client = state["client"]
    assert client["train"]["step"] == step and client["world_size"] == 2
    assert len(client["loader"]) == 2 and len(client["rng"]) == 2


def assert_every_step_once(run_dir: Path, steps: int) -> None:
    train = [r["step"] for r in records(run_dir, "train")]
    assert train == list(range(1, steps + 1)), train


def assert_bitwise_identical(reference: Path, run_dir: Path, steps: int) -> None:
    """The final checkpoint's tensors and the last validation equal the uninterrupted run's."""
    import torch

    name = f"step-{steps:08d}"
    a = torch.load(reference / "checkpoints" / name / "state.pt", weights_only=True, map_location="cpu")
    b = torch.load(run_dir / "checkpoints" / name / "state.pt", weights_only=True, map_location="cpu")
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ta = {k: v for k, v in a["client"]["train"].items() if k != "wandb_id"}
    tb = {k: v for k, v in b["client"]["train"].items() if k != "wandb_id"}
    assert ta == tb
    va, vb = records(reference, "val")[-1], records(run_dir, "val")[-1]
    assert va["step"] == vb["step"] == steps and va == vb


def job_config(submitted: subprocess.CompletedProcess) -> Path:
    """The copy of the config that a submitted job runs (launch/submit.py prints it)."""
    return Path(re.search(r"config: +(\S+) \(the job runs this copy\)", submitted.stdout).group(1))


def cut_budget(submitted: subprocess.CompletedProcess, steps: int) -> None:
    """Set train.steps in the config copy a requeued job will run: its next attempt resumes and
    takes the new budget (a changed step budget takes effect on resume). A requeued job waits 11 s
    before it may start again (up.sh's cred_expire), time enough to do this first."""
    path = job_config(submitted)
    resolved = yaml.safe_load(path.read_text())
    resolved["train"]["steps"] = steps
    path.with_suffix(".tmp").write_text(yaml.safe_dump(resolved))
    path.with_suffix(".tmp").replace(path)


# --------------------------------------------------------------------------------------------
# Submit time: no cluster needed
# --------------------------------------------------------------------------------------------


def test_dry_run_prints_the_script_and_the_resolved_config_and_writes_nothing(work):
    config = write_config(work, "dry")
    _, proc = submit(
        work,
        config,
        "--dry-run",
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "1",
        "--cpus-per-task",
        "3",
        "--mem-gb",
        "1.5",
        "--time",
        "1:30:00",
        "--partition",
        "batch",
        "--account",
        "acct",
        "--qos",
        "normal",
        "--constraint",
        "cpu&fast",
        "--exclude",
        "node9",
        "--comment",
        "a comment",
        "--signal-delay",
        "90",
        "--max-requeues",
        "4",
        "--slurm",
        "mail-type=END",
        "--slurm",
        "exclusive",
        "--setup",
        "module load python/3.11",
        "optim.lr=2e-3",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    script = out.split("# ---- sbatch script", 1)[1].split("# ---- resolved config", 1)[0]
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=3",
        "#SBATCH --mem=1536MB",
        "#SBATCH --time=90",
        "#SBATCH --partition=batch",
        "#SBATCH --account=acct",
        "#SBATCH --qos=normal",
        "#SBATCH --constraint='cpu&fast'",
        "#SBATCH --exclude=node9",
        "#SBATCH --comment='a comment'",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --requeue",
        "#SBATCH --dependency=singleton",
        "#SBATCH --open-mode=append",
        "#SBATCH --mail-type=END",
        "#SBATCH --exclusive",
        f"#SBATCH --output={work}/runs/dry/slurm/%j_0_log.out",
        "module load python/3.11",
    ]:
        assert line in script.splitlines(), f"{line!r} not in\n{script}"
    assert "B:USR2" not in script and "--wckey" not in script and "gpus" not in script
    assert re.search(r"#SBATCH --job-name=salnet-dry-[0-9a-f]{6}$", script, re.M)
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "-m submitit.core._submit" in srun[0]
    assert all(arg in srun[0].split() for arg in ("--cpus-per-task=3", "--wait=120", "--kill-on-bad-exit=0"))
    assert script.index("module load python/3.11") < script.index("srun ")
    assert "resume:    starts from step 0" in out and "at most 4" in out
    assert "max_requeues=4" in out
    # The resolved config: absolute paths, the override applied.
    resolved = yaml.safe_load(out.split("# ---- resolved config", 1)[1].split("\n", 1)[1])
    assert resolved["data"]["train"] == [str(work / "shards/train")] and resolved["data"]["val"] == [
        str(work / "shards/val")
    ]
    assert resolved["out_dir"] == str(work / "runs") and resolved["optim"]["lr"] == 2e-3
    assert "data.train[0] " + str(work / "shards/train") + ": 64 samples" in out
    assert not (work / "runs" / "dry").exists()  # nothing written


def test_a_gpu_job_runs_one_task_per_gpu(work):
    config = write_config(work, "gpu")
    _, proc = submit(work, config, "--dry-run", "--nodes", "4", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gpus-per-node=8" in proc.stdout and "#SBATCH --ntasks-per-node=8" in proc.stdout
    assert "4 node(s) x 8 task(s) = 32 rank(s), 8 GPU(s) per node (nccl)" in proc.stdout
    _, proc = submit(work, config, "--dry-run", "--gpus-per-node", "4", "--tasks-per-node", "2", check=False)
    assert proc.returncode == 2 and "one task per GPU" in proc.stderr


@pytest.mark.parametrize(
    "case",
    [
        "typo",
        "missing-dir",
        "named-set",
        "no-manifest",
        "weights",
        "steps",
        "owned-flag",
        "time",
        "resume",
        "newline",
        "mem",
        "cpus",
        "sync-bn",
        "out-dir",
    ],
)
def test_submit_time_errors_name_the_key_or_path(work, tmp_path, case):
    config = write_config(work, f"bad-{case}")
    args, env = [], {}
    if case == "typo":
        args, expect = ["optim.lrr=3e-4"], ["unknown key 'optim.lrr'", "did you mean 'optim.lr'"]
    elif case == "missing-dir":
        args, expect = ["data.val=[nowhere/val]"], ["data.val[0]", str(work / "nowhere/val"), "does not exist"]
    elif case == "named-set":
        args, expect = (
            ["data.val={ECSSD: [shards/val], DUTS-TE: [nowhere/duts-te]}"],
            ["data.val.DUTS-TE[0]", str(work / "nowhere/duts-te")],
        )
    elif case == "no-manifest":
        (tmp_path / "half").mkdir()
        args, expect = [f"data.train=[{tmp_path / 'half'}]"], ["data.train[0]", str(tmp_path / "half"), "manifest.json"]
    elif case == "weights":
        env = {"TORCH_HOME": str(tmp_path / "torch")}  # an empty cache
        args = ["model.backbone.weights=imagenet"]
        expect = [
            "model.backbone.weights='imagenet'",
            str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"),
            "curl -fL",
        ]
    elif case == "steps":
        args, expect = ["train.steps=null"], ["train.steps", "train.epochs"]
    elif case == "owned-flag":
        args, expect = ["--slurm", "signal=B:USR1@60"], ["--slurm signal", "--signal-delay"]
    elif case == "time":
        args, expect = ["--time", "1:2:3:4"], ["--time '1:2:3:4'"]
    elif case == "newline":  # would add an #SBATCH line of its own to the script
        args, expect = ["--comment", "x\n#SBATCH --exclusive"], ["--comment 'x\\n#SBATCH --exclusive'", "one line"]
    elif case == "mem":
        args, expect = ["--mem-gb", "-4"], ["--mem-gb", "expected a number > 0, got '-4'"]
    elif case == "cpus":
        args, expect = ["--cpus-per-task", "0"], ["--cpus-per-task", "expected an integer >= 1, got '0'"]
    elif case == "sync-bn":  # a CPU job cannot run SyncBatchNorm; the launcher knows the job's GPUs
        args, expect = ["--gpus-per-node", "0", "train.sync_bn=true"], ["train.sync_bn=true needs CUDA"]
    elif case == "out-dir":  # noticed by --dry-run too
        args, expect = ["--dry-run", "out_dir=/proc/salnet-runs"], ["out_dir='/proc/salnet-runs'", "cannot be made"]
    else:
        args, expect = (
            ["train.resume=runs/x/checkpoints/step-00000001"],
            ["train.resume=", str(work / "runs/x/checkpoints/step-00000001")],
        )
    _, proc = submit(work, config, *args, check=False, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for text in expect:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr}"
    assert not (work / "runs" / f"bad-{case}").exists()


# --------------------------------------------------------------------------------------------
# On the cluster
# --------------------------------------------------------------------------------------------


class Reference:
    """An uninterrupted 2-rank run of the short config, submitted like the user would, with --follow.
    It runs while the USR2 test's job runs (the cluster has room for two 2 x 1-CPU jobs): wait() when
    it is needed."""

    def __init__(self, work: Path):
        self.run_dir = work / "runs" / "reference"
        self.out = work / "reference-submit.out"
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(SUBMIT), *CPU_JOB, "--follow", "--config", str(write_config(work, "reference"))],
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, **ENV},
            )
        start = time.monotonic()
        while not (m := re.search(r"^submitted job (\d+)", self.out.read_text(), re.M)):
            if self.proc.poll() is not None or time.monotonic() - start > 120:
                pytest.fail(f"submit --follow failed ({self.proc.poll()}):\n{self.out.read_text()}")
            time.sleep(0.2)
        self.job = m.group(1)
        _submitted.append(self.job)
        self.code: int | None = None

    def wait(self) -> Path:
        if self.code is None:
            try:
                self.code = self.proc.wait(timeout=JOB_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                pytest.fail(f"submit --follow still running after {JOB_TIMEOUT} s:\n{self.out.read_text()[-4000:]}")
            wait_gone(self.run_dir, self.job)
        return self.run_dir

    @property
    def submit(self) -> str:
        return self.out.read_text()


@pytest.fixture(scope="module")
def reference(cluster, work):
    return Reference(work)


@pytest.mark.slow
def test_usr2_saves_on_both_ranks_requeues_and_resumes_bitwise_identical(reference, work):
    config = write_config(work, "usr2", log={"every": 1, "wandb": True})
    job, proc = submit(work, config, *CPU_JOB, "--max-requeues", "2")
    wandb_id = re.search(r"W&B: +run id ([0-9a-f]+)", proc.stdout).group(1)
    run_dir = work / "runs" / "usr2"
    wait_for_step(run_dir, job, 3)
    sc.scancel("--signal=USR2", job)
    wait_gone(run_dir, job)
    everything = logs(run_dir, job)
    log = rank0_log(run_dir, job)
    step = stopped_step(log, "SIGUSR2")
    assert step < STEPS, everything
    # Both ranks stopped at that step, saved together and asked for a requeue; rank 0 requeued the job once.
    assert_both_ranks_saved_at(run_dir, step)
    for rank in (0, 1):
        rank_log = (run_dir / "slurm" / f"{job}_{rank}_log.out").read_text()
        assert f"salnet.slurm: rank {rank} exits with status 75 (stopped on the warning signal" in rank_log, everything
    assert f"requeued job {job} (restart 1 of at most 2)" in log
    assert sc.show_job(job).get("Restarts") == "1"
    assert [r["JobState"] for r in sc.jobcomp(job)] == ["PENDING", "COMPLETED"], everything
    # The second attempt resumed from the checkpoint both ranks wrote at that step, and finished.
    assert "train.resume=auto" in log and f"step-{step:08d} at step {step}" in log
    assert step in checkpoint_steps(run_dir) and STEPS in checkpoint_steps(run_dir)
    assert_every_step_once(run_dir, STEPS)
    assert_bitwise_identical(reference.wait(), run_dir, STEPS)
    # One W&B run (offline): every attempt logged to the id the launcher printed.
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {wandb_id}, ids


@pytest.mark.slow
def test_a_submitted_job_trains_validates_and_writes_best(reference):
    run_dir, job, out = reference.wait(), reference.job, reference.submit
    # --follow streamed rank 0's log until the job ended, and exited 0 because it COMPLETED.
    assert reference.code == 0 and f"job {job} ended: COMPLETED (exit code 0:0)" in out, out[-3000:]
    assert f"done: {STEPS} steps" in out and "following " in out
    # What the launcher printed.
    config_copy = Path(re.search(r"config: +(\S+) \(the job runs this copy\)", out).group(1))
    assert config_copy.parent == run_dir / "slurm" and config_copy.is_file()
    assert f"rank-0 log:    {run_dir}/slurm/{job}_0_log.out" in out
    assert f"squeue -j {job}" in out and f"scancel {job}" in out and "starts from step 0" in out
    # What the job did: two ranks, the copy of the config, validation, best.pt, exit 0.
    final = sc.jobcomp(job)
    assert [r["JobState"] for r in final] == ["COMPLETED"] and final[-1]["ExitCode"] == "0:0", logs(run_dir, job)
    assert final[-1]["NodeCnt"] == "2"  # which two of the cluster's nodes depends on what else runs
    log = rank0_log(run_dir, job)
    assert f"python -m salnet.train --config {config_copy}" in log
    assert "salnet: 2 rank(s) on cpu (gloo)" in log and f"done: {STEPS} steps" in log
    assert RunDir(run_dir).best.is_file() and checkpoint_steps(run_dir) == [8, STEPS]
    assert [r["step"] for r in records(run_dir, "val")] == [8, STEPS]
    assert_every_step_once(run_dir, STEPS)
    # Submitting the run again: it would resume from its newest checkpoint, with the same W&B run;
    # --fresh would start it over (the job removes the checkpoints) with a new W&B run.
    config = run_dir.parent.parent / "reference.yaml"
    wandb_id = (run_dir / "slurm" / "wandb_id").read_text().strip()
    _, again = submit(run_dir.parent.parent, config, *CPU_JOB, "--dry-run", check=False)
    assert f"resume:    resumes from step {STEPS} ({run_dir}/checkpoints/step-{STEPS:08d})" in again.stdout, (
        again.stdout + again.stderr
    )
    resolved_id = rf"^  wandb_id: '?{wandb_id}'?$"  # the id the launcher writes into the config it submits
    assert re.search(resolved_id, again.stdout, re.M)
    _, fresh = submit(run_dir.parent.parent, config, *CPU_JOB, "--dry-run", "--fresh", check=False)
    assert (
        f"resume:    starts over (train.resume=none): the job removes 2 checkpoint(s) (newest step {STEPS}"
        in fresh.stdout
        and "resume: none" in fresh.stdout
        and not re.search(resolved_id, fresh.stdout, re.M)
    ), fresh.stdout + fresh.stderr
    assert checkpoint_steps(run_dir) == [8, STEPS]  # a dry run removes nothing


@pytest.mark.slow
def test_sbatch_script_passes_the_usr2_scenario(reference, work):
    config = write_config(work, "sbatch")
    out = work / "runs"
    out.mkdir(exist_ok=True)
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--job-name",
            "salnet-sbatch",
            "--nodes",
            "2",
            "--gpus-per-node",
            "0",
            "--ntasks-per-node",
            "1",
            "--cpus-per-task",
            "1",
            "--time",
            "10",
            "--output",
            str(out / "sbatch-%j.out"),
            str(SBATCH),
            "--config",
            str(config),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV, "SALNET_PYTHON": sys.executable, "SALNET_MAX_REQUEUES": "2"},
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    _submitted.append(job)
    run_dir = work / "runs" / "sbatch"
    wait_for_step(run_dir, job, 3)
    sc.scancel("--signal=USR2", job)
    wait_gone(run_dir, job)
    log = (out / f"sbatch-{job}.out").read_text()
    step = stopped_step(log, "SIGUSR2")
    # Rank 0 says how it stopped. srun's own "task N: Exited with exit code 75" lines are not asserted:
    # rank 0 requeues from inside its task, and Slurm may end the step (and srun) before srun prints them.
    assert "salnet.slurm: rank 0 exits with status 75 (stopped on the warning signal" in log, log
    assert_both_ranks_saved_at(run_dir, step)
    assert f"requeued job {job} (restart 1 of at most 2)" in log
    assert [r["JobState"] for r in sc.jobcomp(job)] == ["PENDING", "COMPLETED"], log
    assert f"step-{step:08d} at step {step}" in log and f"done: {STEPS} steps" in log
    assert_every_step_once(run_dir, STEPS)
    assert_bitwise_identical(reference.wait(), run_dir, STEPS)


@pytest.mark.slow
def test_plain_scancel_saves_and_is_not_requeued(cluster, work):
    config = write_config(work, "scancel", train={"steps": 200, "timeout_s": 60}, checkpoint={"every": 100, "keep": 5})
    job, _ = submit(work, config, *CPU_JOB)
    run_dir = work / "runs" / "scancel"
    wait_for_step(run_dir, job, 3)
    sc.scancel(job)
    wait_gone(run_dir, job)
    log = rank0_log(run_dir, job)
    step = stopped_step(log, "SIGTERM")
    assert checkpoint_steps(run_dir) == [step], logs(run_dir, job)
    assert_both_ranks_saved_at(run_dir, step)
    assert "rank 1 exits with status 76" in (run_dir / "slurm" / f"{job}_1_log.out").read_text()
    assert "not requeued" in log and "requeued job" not in log
    # A requeued job never leaves the queue (it waits there as PENDING): this one has, for good.
    assert not sc.squeue_state(job)
    assert [r["JobState"] for r in sc.jobcomp(job)] == ["CANCELLED"] and sc.show_job(job).get("Restarts") == "0"


@pytest.mark.slow
def test_a_crash_on_one_rank_fails_the_job_in_bounded_time_naming_the_rank(cluster, work, tmp_path):
    # Corrupt the last val image: rank 1 holds it and fails in the first validation, while rank 0
    # waits in the metrics all-reduce.
    val = tmp_path / "val"
    key = corrupt_last_val_image(work / "shards" / "val", val)
    config = write_config(
        work, "crash", data={"val": [str(val)]}, train={"steps": 8, "timeout_s": 60}, eval={"every": 2}
    )
    job, _ = submit(work, config, *CPU_JOB, "--srun-wait", "30")
    run_dir = work / "runs" / "crash"
    waited = wait_gone(run_dir, job, timeout=180)
    everything = logs(run_dir, job)
    err1 = (run_dir / "slurm" / f"{job}_1_log.err").read_text()
    assert "[rank 1]" in err1 and key in err1, everything
    # The failing rank left by itself (srun did not have to kill it), and the job ended in bounded time.
    assert "task 1: Exited with exit code 1" in everything, everything
    assert waited < 90, f"the job took {waited:.0f} s to fail:\n{everything}"
    final = sc.jobcomp(job)
    assert [r["JobState"] for r in final] == ["FAILED"] and sc.show_job(job).get("Restarts") == "0", everything
    assert final[-1]["ExitCode"] not in ("75:0", "76:0", "0:0")


@pytest.mark.slow
def test_max_requeues_is_honoured_and_a_second_submit_waits_for_the_first(cluster, work):
    config = write_config(work, "singleton")
    first, _ = submit(work, config, *CPU_JOB, "--max-requeues", "0")
    run_dir = work / "runs" / "singleton"
    second, proc = submit(work, config, *CPU_JOB)
    assert f"waits for:     job(s) {first} of the same run (--dependency=singleton)" in proc.stdout
    wait_for_step(run_dir, first, 3)
    assert sc.squeue_reason(second) == "PENDING Dependency"  # not writing the same run directory
    sc.scancel("--signal=USR2", first)
    wait_gone(run_dir, first)
    log = rank0_log(run_dir, first)
    step = stopped_step(log, "SIGUSR2")
    assert "not requeued: 0 restart(s) reached --max-requeues=0" in log, logs(run_dir, first)
    assert [r["JobState"] for r in sc.jobcomp(first)] == ["FAILED"] and sc.show_job(first).get("Restarts") == "0"
    # The waiting job starts only now, resumes from the first job's checkpoint and finishes the run.
    wait_gone(run_dir, second)
    log2 = rank0_log(run_dir, second)
    assert f"step-{step:08d} at step {step}" in log2 and f"done: {STEPS} steps" in log2, logs(run_dir, second)
    assert sc.jobcomp(second)[-1]["StartTime"] >= sc.jobcomp(first)[-1]["EndTime"]
    assert_every_step_once(run_dir, STEPS)


@pytest.mark.slow
def test_preemption_by_a_higher_priority_partition_saves_requeues_and_finishes(cluster, work):
    budget = 40  # still training when the preemption comes; cut to two more steps once it has come
    config = write_config(
        work,
        "preempted",
        train={"steps": budget, "timeout_s": 60},
        eval={"every": 20},
        checkpoint={"every": 20, "keep": 5},
    )
    job, proc = submit(work, config, *CPU_JOB)
    run_dir = work / "runs" / "preempted"
    wait_for_step(run_dir, job, 3)
    # The job's own two nodes, whole: Slurm must preempt the batch job to run it (the cluster may have
    # more nodes, free ones among them: `make test` runs it with 4).
    nodes = sc.show_job(job)["NodeList"]
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "urgent", "-N", "2", "-w", nodes, "--exclusive", "-o", "/dev/null"]
        + ["--wrap", "sleep 2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    _submitted.append(urgent)
    start = time.monotonic()
    while not [r for r in sc.jobcomp(job) if r["JobState"] == "PENDING"]:  # the preempted attempt's end
        if not sc.squeue_state(job) or time.monotonic() - start > JOB_TIMEOUT:
            pytest.fail(f"job {job} was not preempted and requeued:\n{logs(run_dir, job)}")
        time.sleep(0.2)
    step = stopped_step(rank0_log(run_dir, job), "SIGUSR2")
    steps = step + 2
    cut_budget(proc, steps)
    wait_gone(run_dir, job, timeout=JOB_TIMEOUT)
    log = rank0_log(run_dir, job)
    assert step < budget and f"step-{step:08d} at step {step}" in log, logs(run_dir, job)
    assert f"train.steps: {budget} -> {steps}" in log, log  # the resumed attempt took the new budget
    assert_both_ranks_saved_at(run_dir, step)
    assert int(sc.show_job(job).get("Restarts", 0)) >= 1
    states = [r["JobState"] for r in sc.jobcomp(job)]
    assert states[-1] == "COMPLETED" and "PENDING" in states, states
    ran = sc.jobcomp(urgent)
    assert ran and ran[-1]["JobState"] == "COMPLETED"
    assert ran[-1]["StartTime"] <= sc.jobcomp(job)[-1]["StartTime"]  # it ran while ours waited
    assert steps in checkpoint_steps(run_dir) and RunDir(run_dir).best.is_file()
    assert_every_step_once(run_dir, steps)


def seconds_per_step(run_dir: Path) -> float:
    """The median step time of a finished 2-rank run of the tiny config on this machine now."""
    rates = sorted(r["images_per_s"] for r in records(run_dir, "train") if r.get("images_per_s"))
    return 8 / rates[len(rates) // 2] if rates else 0.5  # global batch: 2 ranks x 4


@pytest.mark.slow
def test_a_real_time_limit_ends_in_a_requeue_and_a_finished_run(reference, work):
    # --time 1 with a 30 s warning: Slurm checks limits every 30 s and sends a warning that would fall
    # due before its next check at once, so the warning reaches every task within the first 30 s of
    # the attempt. The step budget is a minute at the reference run's pace, twice what that needs, so
    # the run still trains then even on a machine that has become faster; once the warning has ended
    # the first attempt, the budget is cut to two more steps, so the requeued attempt is short.
    budget = min(1000, max(80, round(60 / seconds_per_step(reference.wait()))))
    config = write_config(
        work,
        "timelimit",
        train={"steps": budget, "timeout_s": 60},
        eval={"every": budget},
        checkpoint={"every": budget, "keep": 5},
    )
    args = list(CPU_JOB)
    args[args.index("--time") + 1] = "1"
    args[args.index("--signal-delay") + 1] = "30"
    run_dir = work / "runs" / "timelimit"
    # When Slurm's first limit check falls within the tasks' launch (about 1 in 30 attempts: the job
    # below ended 0.2 s after it started), the warning reaches a task before Python has started and
    # kills it: no handler can exist yet, and no salnet line is printed. That attempt is submitted again
    # (once): what this test is about is a warning that reaches salnet.
    for attempt in (1, 2):
        job, proc = submit(work, config, *args, "--max-requeues", "3")
        start = time.monotonic()
        while sc.show_job(job).get("Restarts") != "1":
            if not sc.squeue_state(job) or time.monotonic() - start > 150:
                if attempt == 1 and not sc.squeue_state(job) and "salnet.slurm:" not in logs(run_dir, job):
                    print(f"job {job}: the warning came before the tasks started; submitted again")
                    break
                pytest.fail(f"job {job} was not requeued on its time limit's warning:\n{logs(run_dir, job)}")
            time.sleep(0.2)
        else:
            break
    first = rank0_log(run_dir, job)
    assert f"requeued job {job} (restart 1 of at most 3)" in first, logs(run_dir, job)
    # A warning during start-up, before the ranks' first step, ends the attempt at once with nothing
    # to save (about one attempt in ten here: start-up takes seconds of the 30 s window); one during
    # training saves at the step the ranks agree on.
    started_over = "before the first step: nothing to save" in logs(run_dir, job)
    step = 0 if started_over else stopped_step(first, "SIGUSR2")
    assert step < budget
    # The requeued attempt would get the same one-minute limit, and so the same warning within 30 s:
    # give it the time to finish instead, and two steps to go. The first attempt is what this test is about.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True, timeout=30)
    steps = step + 2
    cut_budget(proc, steps)
    wait_gone(run_dir, job)
    log = rank0_log(run_dir, job)
    assert f"done: {steps} steps" in log, logs(run_dir, job)
    if not started_over:  # resumed where it saved, and took the new budget
        assert f"step-{step:08d} at step {step}" in log and f"train.steps: {budget} -> {steps}" in log, log
    states = [r["JobState"] for r in sc.jobcomp(job)]
    assert states == ["PENDING", "COMPLETED"], states  # never TIMEOUT: it left before the limit
    assert steps in checkpoint_steps(run_dir)
    assert_every_step_once(run_dir, steps)
