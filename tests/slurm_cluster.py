"""Helpers for the Slurm tests: the local cluster (slurm/local/up.sh, N nodes on this machine) and its jobs.

The tests share one cluster: `make test` brings it up with NODES nodes (the most any test needs) before
pytest starts; a module run alone brings it up itself (`ensure_cluster`) and stops it at the end only
if it started it. A running cluster with fewer nodes than a test needs is grown by up.sh (a restart,
which up.sh refuses while jobs are queued: the error says so).

Without slurmdbd there is no sacct: a job is watched with squeue while it is queued or running,
`scontrol show job` (kept MinJobAge=60 s after the end: Restarts, ExitCode) and the job completion
log that up.sh configures (one line per end of an attempt: a requeue shows as JobState=PENDING).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("SALNET_SLURM_STATE", "/var/tmp/salnet-slurm"))
JOBCOMP = STATE / "log" / "jobcomp.log"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


NODES = 4  # the most nodes any test uses (tests/test_multinode.py): `make test` starts this many


def cluster_nodes() -> dict[str, str] | None:
    """{node: state} of the batch partition, None when slurmctld does not answer."""
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        nodes = subprocess.run(
            ["sinfo", "-h", "-N", "-p", "batch", "-o", "%N %t"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if "UP" not in ping.stdout or nodes.returncode != 0:
        return None
    return dict(line.split() for line in nodes.stdout.splitlines() if line.strip())


def cluster_ready(min_nodes: int = 2) -> bool:
    """Whether up.sh's cluster runs with node1..nodeK, K >= min_nodes, every node taking jobs."""
    states = cluster_nodes()
    if not states:
        return False
    names = sorted(states, key=lambda name: int(name[4:]) if name[4:].isdigit() else -1)
    return (
        len(names) >= min_nodes
        and names == [f"node{k}" for k in range(1, len(names) + 1)]
        and all(s in ("idle", "mix", "alloc", "comp") for s in states.values())  # comp: a job is ending there
    )


def up(nodes: int | None = None) -> str:
    """Run up.sh (with --nodes when given: another count than the running cluster's restarts it)."""
    argv = [str(REPO / "slurm/local/up.sh")] + (["--nodes", str(nodes)] if nodes else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"slurm/local/up.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def ensure_cluster(min_nodes: int = 2) -> bool:
    """Bring the cluster up with at least `min_nodes` nodes unless it runs so; True if up.sh started
    slurmctld here (the caller then stops it with down() when done), False if it was already running."""
    if cluster_ready(min_nodes):
        return False
    running = cluster_nodes()
    out = up(max(min_nodes, len(running or {})))
    print(out)
    return "started slurmctld" in out and not running


@contextlib.contextmanager
def module_cluster(min_nodes: int = 2) -> Iterator[list[str]]:
    """The cluster for one test module (its fixture: `with module_cluster(4) as jobs: yield jobs`).

    Skips, saying why, where Slurm is not installed; brings the cluster up with at least `min_nodes`
    nodes (ensure_cluster); yields a list the module appends its job ids to. At the end it cancels
    those still queued, and stops the cluster only if it started it here (another module, or
    `make test`, may be using it)."""
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"Slurm is not installed here (missing {', '.join(missing)}): .ci/run installs slurmctld, slurmd, "
            f"slurm-client and munge with apt-get, or run slurm/local/up.sh --nodes {max(min_nodes, 2)} as root"
        )
    started = ensure_cluster(min_nodes)
    mark_jobcomp_start()
    jobs: list[str] = []
    try:
        yield jobs
    finally:
        left = [j for j in jobs if squeue_state(j)]
        if left:
            subprocess.run(["scancel", *left], timeout=30)
        if started:
            print(down())


def down() -> str:
    proc = subprocess.run([str(REPO / "slurm/local/down.sh")], capture_output=True, text=True, timeout=300)
    return proc.stdout + proc.stderr


def squeue_state(job: str) -> str:
    """'' once the job has left the queue, else PENDING/RUNNING/COMPLETING/..."""
    proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def squeue_reason(job: str) -> str:
    proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()


def show_job(job: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return {}
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


_JOBCOMP_START = 0  # byte offset: records before it belong to jobs of an earlier session


def mark_jobcomp_start() -> None:
    """Ignore the completion records written so far (job ids start over when the cluster does)."""
    global _JOBCOMP_START
    _JOBCOMP_START = JOBCOMP.stat().st_size if JOBCOMP.exists() else 0


def jobcomp(job: str) -> list[dict[str, str]]:
    """The completion log's records of `job` in this session, oldest first (one per attempt that ended)."""
    if not JOBCOMP.exists():
        return []
    with open(JOBCOMP, "rb") as f:
        f.seek(_JOBCOMP_START if JOBCOMP.stat().st_size >= _JOBCOMP_START else 0)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        if line.startswith(f"JobId={job} "):
            out.append(dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)))
    return out


def wait_gone(job: str, timeout: float) -> float:
    """Wait until the job has left the queue for good; returns the seconds waited."""
    start = time.monotonic()
    while squeue_state(job):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"job {job} still in the queue after {timeout:.0f} s: {squeue_reason(job)}")
        time.sleep(0.5)
    # the completion log is written as the job ends; give slurmctld a moment to flush it
    for _ in range(20):
        records = jobcomp(job)
        if records and records[-1]["JobState"] != "PENDING":
            break
        time.sleep(0.25)
    return time.monotonic() - start


def wait_state(job: str, states: tuple[str, ...], timeout: float) -> str:
    start = time.monotonic()
    while True:
        state = squeue_state(job)
        if state in states:
            return state
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"job {job} did not reach {states} within {timeout:.0f} s (now {state or 'gone'})")
        time.sleep(0.2)


def scancel(*args: str) -> None:
    subprocess.run(["scancel", *args], check=True, timeout=30)


def write_run_config(root: Path, name: str, steps: int, **sections) -> Path:
    """root/NAME.yaml: a tiny run of `steps` steps (validated and saved at its middle and end), paths
    relative to `root` (the launcher makes them absolute); `sections` update the config's sections."""
    cfg = {
        "name": name,
        "out_dir": "runs",
        # one loader worker per rank: Slurm signals it too, and it must ignore the signal
        "data": {
            "train": ["shards/train"],
            "val": ["shards/val"],
            "size": 64,
            "eval_size": 64,
            "batch_size": 4,
            "eval_batch_size": 8,
            "workers": 1,
        },
        "model": {"backbone": {"name": "resnet18", "weights": "none"}, "ppm_width": 32, "fpn_width": 32},
        "optim": {"lr": 1e-3, "backbone_lr_mult": 1.0, "warmup_steps": 2},
        "train": {"steps": steps, "timeout_s": 60},
        "eval": {"every": steps // 2},
        "checkpoint": {"every": steps // 2, "keep": 5},
        "log": {"every": 1, "plots": False},  # drawn in test_report and test_dashboards; here only CPU
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
