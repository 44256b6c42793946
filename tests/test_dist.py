import json

import pytest

from salnet.dist import DistEnv, detect_env, first_slurm_host, slurm_port

from conftest import REPO, free_port, run_py, torchrun

PROBE = REPO / "tests" / "dist_probe.py"


def reports(stdout):
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return sorted((r for r in lines if "rank" in r), key=lambda r: r["rank"]), [r for r in lines if "rank" not in r]


def test_single_process_needs_no_group():
    out = run_py([PROBE, "name=single"]).stdout
    ranks, exits = reports(out)
    assert len(ranks) == 1
    r = ranks[0]
    assert (r["launcher"], r["world"], r["backend"], r["sum"], r["gathered"]) == ("single", 1, None, 1.0, [0])
    assert exits == [{"initialized_after_exit": False}]


@pytest.mark.slow
def test_torchrun_two_ranks_gloo_all_reduce_and_rank0_prints_config_once():
    out = torchrun(2, [PROBE, "name=pair", "train.seed=7"]).stdout
    ranks, exits = reports(out)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["launcher"] == "torchrun" and r["world"] == 2 and r["backend"] == "gloo"
        assert r["sum"] == 3.0 and r["avg"] == 0.5 and r["any"] is True and r["gathered"] == [0, 1]
        assert r["device"] == "cpu"
    # per-rank seeding: different seeds and different random streams on the two ranks
    assert ranks[0]["seed"] != ranks[1]["seed"]
    assert ranks[0]["first_draw"] != ranks[1]["first_draw"]
    assert out.count("name: pair") == 1  # resolved config printed once, by rank 0
    assert exits == [{"initialized_after_exit": False}] * 2


def test_slurm_variables_without_torchrun():
    """Two processes started the way srun/Submitit start them: only SLURM_* variables."""
    import os
    import subprocess
    import sys

    job_id = str(free_port())  # the port is derived from the job id; make it a free one
    port = slurm_port(job_id)
    procs = []
    for rank in range(2):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        }
        env.update(
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS="2",
            SLURM_JOB_ID=job_id,
            SLURM_JOB_NODELIST="localhost",
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(PROBE), "name=slurm"],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ranks, _ = reports("".join(o for o, _ in outs))
    assert [(r["rank"], r["launcher"], r["world"], r["sum"]) for r in ranks] == [
        (0, "slurm", 2, 3.0),
        (1, "slurm", 2, 3.0),
    ]
    assert 20000 <= port < 40000


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_without_hanging():
    # The subprocess timeout is the hang detector: a hang fails the test with TimeoutExpired.
    proc = torchrun(2, [PROBE, "name=fail", "train.timeout_s=60"], check=False, timeout=170)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node1", "node1"),
        ("node[1-2]", "node1"),
        ("gpu[03-05,9],cpu1", "gpu03"),
        ("a-b[7,9]", "a-b7"),
        ("n1,n2", "n1"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_detect_env_precedence_and_values():
    assert detect_env({}) == DistEnv()
    torchrun_env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "0",
        "SLURM_JOB_ID": "5",
    }
    assert detect_env(torchrun_env) == DistEnv(3, 1, 8, "h", 1234, "torchrun")  # torchrun inside Slurm wins
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
    }
    assert detect_env(slurm) == DistEnv(5, 1, 8, "gpu07", slurm_port("4242"), "slurm")
    assert detect_env({**slurm, "SLURM_STEP_NUM_TASKS": "4"}).world_size == 4
    with pytest.raises(RuntimeError, match="RANK='x'"):
        detect_env({"RANK": "x", "WORLD_SIZE": "2"})
