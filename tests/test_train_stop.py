"""Stop signals in the training loop (the part shared by torchrun, srun and Submitit): every rank
stops at the same step, saves there, exits with the code that says what happened, and a resumed run
ends exactly where an uninterrupted one does. The Slurm end of it is in test_slurm.py."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from test_train import records, tiny_config

from salnet.run.preemption import EXIT_REQUEUE, EXIT_STOPPED
from salnet.run.rundir import RunDir
from salnet.shards.synth import synthesize

from conftest import Forked, free_port, ranks, spawn_torchrun

pytestmark = pytest.mark.slow  # every test here starts training runs

STEPS = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train, val = synthesize(root / "demo", train=64, val=16, size=64, seed=5)
    return {"train": train, "val": val}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards):
    """The final checkpoint of a run nobody stopped."""
    path, run_dir = run_config(tmp_path_factory.mktemp("uninterrupted"), shards)
    ranks(2, ["-m", "salnet.train", "--config", path], timeout=400)
    return torch.load(run_dir / "checkpoints" / f"step-{STEPS:08d}" / "state.pt", weights_only=True)


def run_config(tmp_path, shards):
    return tiny_config(
        tmp_path,
        shards,
        train={"steps": STEPS},
        eval={"every": 8},
        checkpoint={"every": STEPS, "keep": 5},
        log={"every": 1},
    )


def wait_for_step(run_dir, step, procs, timeout=300):
    """Block until metrics.jsonl has logged `step` (the run is well inside its loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(
            json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines() if line.endswith("}")
        ):
            return
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"process exited early ({p.returncode}):\n{p.stdout.read()}\n{p.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"step {step} not logged within {timeout} s")


def children(pid):
    """Process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def assert_resumed_run_equals(run_dir, uninterrupted):
    final = torch.load(run_dir / "checkpoints" / f"step-{STEPS:08d}" / "state.pt", weights_only=True)
    for key, value in uninterrupted["model"].items():
        assert torch.equal(value, final["model"][key]), key
    for a, b in zip(uninterrupted["optimizer"]["state"].values(), final["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert uninterrupted["client"]["train"] == final["client"]["train"]
    # metrics.jsonl reads as one run: every step once.
    steps = [r["step"] for r in records(run_dir, "train")]
    assert steps == list(range(1, STEPS + 1))


def test_a_warning_signal_to_one_rank_stops_every_rank_at_one_step_and_resume_is_exact(tmp_path, shards, uninterrupted):
    path, run_dir = run_config(tmp_path, shards)
    port = free_port()
    group = [
        Forked(
            ["-m", "salnet.train", "--config", path],
            env={
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for r in range(2)
    ]
    wait_for_step(run_dir, 3, group)
    group[1].send_signal(signal.SIGUSR2)  # rank 1 only: rank 0 learns of it in the step's all-reduce
    outs = [p.communicate(timeout=120) for p in group]
    assert [p.returncode for p in group] == [EXIT_REQUEUE, EXIT_REQUEUE], outs
    stopped = [line for line in outs[0][0].splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and "a signal to another rank" in stopped[0], outs[0][0]
    step = int(stopped[0].split()[3])
    assert 3 <= step < STEPS
    # one checkpoint, at the agreed step, written by both ranks together
    assert [p.name for p in RunDir(run_dir).complete_checkpoints()] == [f"step-{step:08d}"]
    assert (
        torch.load(RunDir(run_dir).complete_checkpoints()[0] / "state.pt", weights_only=True)["client"]["train"]["step"]
        == step
    )

    out = ranks(2, ["-m", "salnet.train", "--config", path], timeout=400).stdout
    assert f"step-{step:08d} at step {step}" in out
    assert_resumed_run_equals(run_dir, uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C in torchrun's terminal
def test_sigterm_or_ctrl_c_to_torchrun_saves_and_does_not_ask_for_a_requeue(tmp_path, shards, sig):
    path, run_dir = run_config(tmp_path, shards)
    agent = spawn_torchrun(2, ["-m", "salnet.train", "--config", path])
    wait_for_step(run_dir, 2, [agent])
    agent.send_signal(sig)  # torchrun's agent passes SIGTERM and SIGINT on to its workers
    out, err = agent.communicate(timeout=120)
    assert agent.returncode != 0
    assert "stopped at step" in out and f"{sig.name} (" in out, out + err
    step = int(out.split("stopped at step ")[1].split()[0])
    assert [p.name for p in RunDir(run_dir).complete_checkpoints()] == [f"step-{step:08d}"]
    # torchrun's agent exits with its own status (1 after SIGTERM), not the ranks' 76: rank 0 says it.
    assert f"exit status {EXIT_STOPPED}: checkpoint saved, do not requeue" in out, out


def test_torchrun_max_restarts_resumes_from_the_newest_checkpoint(tmp_path, shards, uninterrupted):
    path, run_dir = run_config(tmp_path, shards)
    config = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
    config["checkpoint"]["every"] = 4
    path.write_text(__import__("yaml").safe_dump(config))
    agent = spawn_torchrun(2, ["-m", "salnet.train", "--config", path], max_restarts=1)
    wait_for_step(run_dir, 5, [agent])  # past the step-4 checkpoint
    workers = children(agent.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)  # a crash, not a stop: the agent restarts both ranks
    out, err = agent.communicate(timeout=400)
    assert agent.returncode == 0, out + err
    assert "resumed from" in out
    assert_resumed_run_equals(run_dir, uninterrupted)


def test_when_the_launcher_dies_the_ranks_save_and_stop_instead_of_training_unsupervised(tmp_path, shards):
    path, run_dir = run_config(tmp_path, shards)
    agent = spawn_torchrun(2, ["-m", "salnet.train", "--config", path])
    wait_for_step(run_dir, 2, [agent])
    workers = children(agent.pid)
    assert len(workers) == 2, workers
    agent.send_signal(signal.SIGUSR1)  # torchrun's agent does not handle USR1: it dies at once
    agent.communicate(timeout=60)
    deadline = time.monotonic() + 120
    while any(os.path.exists(f"/proc/{pid}") and not zombie(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") and not zombie(pid) for pid in workers), (
        "ranks kept running without their launcher"
    )
    checkpoints = RunDir(run_dir).complete_checkpoints()
    assert len(checkpoints) == 1  # saved at the step where the ranks learnt of it, then left
    saved = int(checkpoints[0].name.split("-")[1])
    assert 2 <= saved < STEPS
    assert [r["step"] for r in records(run_dir, "train")][-1] == saved


def zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def alive(pid):
    return os.path.exists(f"/proc/{pid}") and not zombie(pid)


def kill_the_whole_job(agent):
    """SIGKILL torchrun's agent and its ranks at once. torchrun starts each rank in a session of its
    own, so the agent's process group does not hold them: killed alone, the agent would leave them
    running (they would save at their next step, having lost their launcher, or wait out
    train.timeout_s for a rendezvous the agent no longer serves)."""
    ranks = children(agent.pid)
    assert len(ranks) == 2, f"the job has {len(ranks)} rank(s) to kill (agent exit status: {agent.poll()})"
    for pid in [*ranks, agent.pid]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in ranks), f"ranks {ranks} outlived the kill"


def metrics_lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return set(path.read_text().splitlines()) if path.exists() else set()


def newest_step(lines):
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def test_kill_9_at_random_moments_including_saves_then_resume_ends_bitwise_equal(tmp_path, shards, uninterrupted):
    """The run is killed (the whole job, SIGKILL) at several moments, one of them inside a checkpoint
    save; every restart resumes; the end result is the uninterrupted run's, and metrics.jsonl holds
    each step once."""
    import random

    path, run_dir = run_config(tmp_path, shards)
    config = __import__("yaml").safe_load(path.read_text())
    config["checkpoint"]["every"] = 2
    path.write_text(__import__("yaml").safe_dump(config))
    rng = random.Random(1234)
    for attempt in range(3):
        before = metrics_lines(run_dir)
        agent = spawn_torchrun(
            2,
            ["-m", "salnet.train", "--config", path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if attempt == 0:  # inside a save: the moment its temporary directory appears
            deadline = time.monotonic() + 300
            while not list((run_dir / "checkpoints").glob(".step-*.tmp")) and time.monotonic() < deadline:
                time.sleep(0.005)
        else:  # past start-up, at a random step before the end and a random moment in it
            checkpoints = RunDir(run_dir).complete_checkpoints()
            resumes_at = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
            target = rng.randint(min(resumes_at + 1, STEPS - 3), STEPS - 3)
            deadline = time.monotonic() + 300
            while newest_step(metrics_lines(run_dir) - before) < target and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        kill_the_whole_job(agent)
    out = ranks(2, ["-m", "salnet.train", "--config", path], timeout=400).stdout
    assert "resumed from" in out
    assert_resumed_run_equals(run_dir, uninterrupted)
