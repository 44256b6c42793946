"""Shared test helpers: run salnet entry points in real subprocesses (torchrun, srun-like env)."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

# One OpenMP thread in the pytest processes too, set before torch is imported (the subprocesses get
# it from python_env): make test runs two workers on two cores, where each worker's own threads
# would only contend with the other's processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from salnet.dist import free_port  # noqa: E402  (torch comes in here) the tests' rendezvous ports

REPO = Path(__file__).resolve().parents[1]

# The modules that take longest, in that order, run first: `make test` runs the suite on two
# pytest-xdist workers that take whole modules (--dist loadscope, in this order), so the long ones
# start at once and the short ones fill in at the end, and both workers finish at about the same time.
LONGEST_FIRST = ("test_slurm.py", "test_train.py", "test_train_stop.py", "test_deepspeed.py", "test_dashboards.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def python_env(env=None):
    """The environment of a test's subprocess: this one, unbuffered output, one OpenMP thread, then `env`."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}


def run_py(args, env=None, timeout=120, cwd=REPO, check=True):
    """Run `python ARGS...` with this interpreter; fail the test with its output on error."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        env=python_env(env),
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {args}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def spawn(args, env=None, **popen):
    """Start `python ARGS...` as run_py runs it, without waiting: stdout and stderr piped (text) unless
    `popen` (subprocess.Popen's arguments) says otherwise."""
    options = {"cwd": REPO, "text": True, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, *map(str, args)], env=python_env(env), **options)


def torchrun_args(nproc, args, max_restarts=None):
    """`-m torch.distributed.run` with N ranks on CPU (gloo), then ARGS: a static rendezvous on a free
    local port, or with `max_restarts` the c10d rendezvous (torchrun's choice for elastic jobs: every
    restart rendezvouses afresh)."""
    if max_restarts is None:
        rendezvous = ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    else:
        rendezvous = [
            f"--max-restarts={max_restarts}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        ]
    return ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *rendezvous, *args]


def torchrun(nproc, args, env=None, timeout=180, check=True):
    """`torchrun --nproc_per_node N ARGS...` on CPU (gloo), on a free port; waits, as run_py."""
    return run_py(torchrun_args(nproc, args), env=env, timeout=timeout, check=check)


def spawn_torchrun(nproc, args, env=None, max_restarts=None, **popen):
    """torchrun's agent started in the background, as spawn starts it (torchrun_args)."""
    return spawn(torchrun_args(nproc, args, max_restarts), env=env, **popen)


def corrupt_last_val_image(val: Path, into: Path) -> str:
    """A copy of the val shard directory `val` at `into` whose last sample's image bytes are no image
    (the tar stays intact): the rank whose share holds it fails while decoding it. Returns its key."""
    shutil.copytree(val, into)
    tar_path = sorted(into.glob("*.tar"))[-1]
    with tarfile.open(tar_path) as tar:
        last_image = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".png")) and ".mask." not in m.name][-1]
    with open(tar_path, "r+b") as f:
        f.seek(last_image.offset_data)
        f.write(b"not an image at all")
    return last_image.name.split(".")[0]
