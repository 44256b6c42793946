"""Shared test helpers: run salnet entry points in real subprocesses (torchrun, srun-like env)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from salnet.dist import free_port  # noqa: F401  (the tests' rendezvous ports)

REPO = Path(__file__).resolve().parents[1]


def run_py(args, env=None, timeout=120, cwd=REPO, check=True):
    """Run `python ARGS...` with this interpreter; fail the test with its output on error."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        env=full_env,
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {args}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def torchrun(nproc, args, env=None, timeout=180, check=True):
    """`torchrun --nproc_per_node N ARGS...` on CPU (gloo), on a free port."""
    return run_py(
        [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            *args,
        ],
        env=env,
        timeout=timeout,
        check=check,
    )
