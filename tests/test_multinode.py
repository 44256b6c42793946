"""Multi-node runs, two ways: the README's 4-node Slurm submit on the local cluster (slurm/local/up.sh
with 4 nodes), and torchrun across two hosts with their own addresses (network namespaces, tests/netns.py).

Both train resnet18 at 64 px on 64 synthetic scenes; each run is 16 steps. A run that was stopped
(USR2 and a requeue; SIGKILL and a torchrun restart) ends bitwise equal to one that was not.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import netns
import pytest
import slurm_cluster as sc
import torch
from test_slurm import assert_bitwise_identical, logs, records, wait_for_step, wait_gone
from test_train import tiny_config
from test_train_stop import assert_resumed_run_equals, children

from salnet.run.rundir import RunDir
from salnet.shards.synth import synthesize

from conftest import REPO, python_env

pytestmark = pytest.mark.slow  # every test here starts training runs

NODES = 4
STEPS = 16  # as test_train_stop's and test_slurm's runs: their helpers check step 16


# --------------------------------------------------------------------------------------------
# The README's `python launch/submit.py --nodes 4 --gpus-per-node 0 --config configs/demo.yaml`
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with sc.module_cluster(NODES) as jobs:
        yield jobs


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A directory laid out as the README's command expects it: configs/ (this checkout's) and
    shards/demo/{train,val} (tiny here; `make demo` makes the full set)."""
    root = tmp_path_factory.mktemp("demo4")
    (root / "configs").symlink_to(REPO / "configs")
    synthesize(root / "shards" / "demo", train=64, val=16, size=64, seed=5)
    return root


# The README's command as typed, then overrides that make the run tiny (16 steps at 64 px, global batch 16).
README_SUBMIT = ["--nodes", str(NODES), "--gpus-per-node", "0", "--config", "configs/demo.yaml"]
TINY = [
    f"train.steps={STEPS}",
    "eval.every=8",
    "checkpoint.every=8",
    "log.every=1",
    "log.plots=false",
    "data.size=64",
    "data.eval_size=64",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.workers=1",
    "model.ppm_width=32",
    "model.fpn_width=32",
    "optim.warmup_steps=2",
]


def submit_demo(root: Path, name: str) -> str:
    """Submit the README's command (tiny overrides, run `name`) from `root`; returns the job id."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "submit.py"), *README_SUBMIT, *TINY, f"name={name}"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, f"submit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert f"{NODES} node(s) x 1 task(s) = {NODES} rank(s), CPU (gloo)" in proc.stdout, proc.stdout
    return re.search(r"^submitted job (\d+)", proc.stdout, re.M).group(1)


def test_the_readme_4_node_submit_runs_a_rank_per_node_and_a_usr2_requeue_ends_bitwise_equal(cluster, demo_dir):
    # Two identical submissions at once (each node has 2 CPUs: they run side by side); one gets USR2.
    plain, stopped = submit_demo(demo_dir, "plain"), submit_demo(demo_dir, "stopped")
    cluster += [plain, stopped]
    runs = demo_dir / "runs"
    wait_for_step(runs / "stopped", stopped, 3)
    sc.scancel("--signal=USR2", stopped)
    for job, name in ((plain, "plain"), (stopped, "stopped")):
        wait_gone(runs / name, job)
        ends = sc.jobcomp(job)
        assert ends and ends[-1]["JobState"] == "COMPLETED", logs(runs / name, job)
        # Every attempt had the 4 nodes, one task each, and rank r ran on the job's node r.
        assert {(e["NodeList"], e["NodeCnt"], e["ProcCnt"]) for e in ends} == {("node[1-4]", "4", "4")}, ends
        for rank in range(NODES):
            log = (runs / name / "slurm" / f"{job}_{rank}_log.out").read_text()
            assert f"node={rank}({NODES}), global_rank={rank}({NODES})" in log, log[-3000:]
        assert f"salnet: {NODES} rank(s) on cpu (gloo)" in (runs / name / "slurm" / f"{job}_0_log.out").read_text()
    log = (runs / "stopped" / "slurm" / f"{stopped}_0_log.out").read_text()
    step = int(re.search(r"stopped at step (\d+) on SIGUSR2", log).group(1))
    assert f"requeued job {stopped} (restart 1 of at most" in log and f"step-{step:08d} at step {step}" in log, log
    assert "PENDING" in [e["JobState"] for e in sc.jobcomp(stopped)]  # the requeue's end of the first attempt
    # With more than two ranks this needs DDP's gradient buckets to be the same in every attempt: DDP
    # rebuilds them after the first backward of a process, so a resumed attempt's first step would
    # all-reduce in other buckets than the uninterrupted run's same step, and a sum of 4 ranks' values
    # rounds by the order the ring adds them in (2 ranks' a + b does not): salnet/strategy/ddp.py.
    assert_bitwise_identical(runs / "plain", runs / "stopped", STEPS)
    assert [r["step"] for r in records(runs / "stopped", "train")] == list(range(1, STEPS + 1))


# --------------------------------------------------------------------------------------------
# torchrun --nnodes 2 across two hosts (network namespaces) vs --standalone on one
# --------------------------------------------------------------------------------------------


@pytest.fixture
def shared_dir():
    """The two hosts' shared file system: /var/tmp, since each host has its own empty /tmp."""
    path = Path(tempfile.mkdtemp(prefix="salnet-multinode-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def wait_past_step(run_dir: Path, step: int, procs: list[subprocess.Popen], outs: list[Path], timeout: float = 240):
    """Wait until rank 0 has logged a training step > `step`; fail with the hosts' output if a launcher exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] > step for r in records(run_dir, "train")):
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    pytest.fail(f"no training step after {step} logged:\n" + "\n".join(f"--- {o.name}\n{o.read_text()}" for o in outs))


def test_torchrun_across_two_hosts_restarts_a_killed_rank_and_ends_equal_to_one_host(shared_dir):
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    shards = synthesize(shared_dir / "shards", train=64, val=16, size=64, seed=5)
    shards = {"train": shards[0], "val": shards[1]}
    sections = {
        "train": {"steps": STEPS, "timeout_s": 60},
        "eval": {"every": 8},
        "checkpoint": {"every": 4, "keep": 5},
        "log": {"every": 1, "plots": False, "wandb": False},
    }
    for name in ("one", "two"):
        (shared_dir / name).mkdir()
    one_host, one_host_run = tiny_config(shared_dir / "one", shards, **sections)
    two_hosts, two_hosts_run = tiny_config(shared_dir / "two", shards, **sections)
    outs = [shared_dir / f"{name}.out" for name in ("one-host", "salnet-a", "salnet-b")]
    with netns.two_hosts() as hosts:
        endpoint = f"{hosts[0].addr}:29400"  # host a's address: host b reaches it over the veth pair only
        multi = [
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=salnet-two-hosts",
            "--max-restarts=1",
        ]
        launch = [
            torchrun("--standalone", "--nproc_per_node=2", "-m", "salnet.train", "--config", str(one_host)),
            *(host.command(torchrun(*multi, "-m", "salnet.train", "--config", str(two_hosts))) for host in hosts),
        ]
        procs = []
        for argv, out in zip(launch, outs, strict=True):
            with open(out, "w") as f:
                procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=python_env()))
        try:
            wait_past_step(two_hosts_run, 4, procs[1:], outs[1:])  # the step-4 checkpoint is complete
            workers = children(procs[2].pid)  # `ip netns exec`, unshare and tests/netns.py exec torchrun's agent
            assert len(workers) == 1, (workers, outs[2].read_text())
            os.kill(workers[0], signal.SIGKILL)  # host b's rank: a crash, not a stop
            for p in procs:
                assert p.wait(timeout=300) == 0, "\n".join(f"--- {o.name}\n{o.read_text()}" for o in outs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    text = {out.stem: out.read_text() for out in outs}
    # Rank 0 ran on host a, rank 1 on host b: host b's agent restarted its rank (its one restart), host
    # a's agent restarted its own when b came back to the rendezvous; both resumed from the checkpoint.
    assert "salnet: 2 rank(s) on cpu (gloo)" in text["salnet-a"], text["salnet-a"]
    resumed = re.findall(r"resumed from \S*step-(\d+)", text["salnet-a"])
    assert resumed and int(resumed[-1]) >= 4, text["salnet-a"]
    assert "failed (exitcode: -9) local_rank: 0" in text["salnet-b"], text["salnet-b"]  # the agent saw the kill
    uninterrupted = torch.load(
        one_host_run / "checkpoints" / f"step-{STEPS:08d}" / "state.pt", weights_only=True, map_location="cpu"
    )
    assert_resumed_run_equals(two_hosts_run, uninterrupted)
    assert records(one_host_run, "val")[-1] == records(two_hosts_run, "val")[-1]
    assert RunDir(two_hosts_run).best.is_file()
