"""Shared test helpers: run salnet entry points in real subprocesses (torchrun, srun-like env)."""

import atexit
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

# One OpenMP thread in the pytest processes too, set before torch is imported (the subprocesses get
# it from python_env): make test runs two workers on two cores, where each worker's own threads
# would only contend with the other's processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from salnet.dist import free_port  # noqa: E402  (torch comes in here) the tests' rendezvous ports
from salnet.run.preemption import _process_gone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Every process this pytest process starts inherits this variable (each xdist worker sets its own):
# how `leaves_no_process_behind` finds what a test left running, orphans included (a rank whose
# launcher died has parent 1, no longer a descendant of anything here).
PROCESS_MARK = "SALNET_TEST_PROCESS"
os.environ[PROCESS_MARK] = str(os.getpid())
# A Slurm cluster's daemons and jobs belong to the cluster (test_slurm's fixture cancels its jobs at the end).
CLUSTER_PROCESSES = ("slurmctld", "slurmd", "slurmstepd", "munged")

# The modules that take longest, in that order, run first: `make test` runs the suite on two
# pytest-xdist workers that take whole modules (--dist loadscope, in this order), so the long ones
# start at once and the short ones fill in at the end, and both workers finish at about the same time.
LONGEST_FIRST = (
    "test_slurm.py",
    "test_sweep.py",
    "test_multinode.py",
    "test_backbone_families.py",
    "test_train_stop.py",
    "test_train.py",
    "test_deepspeed.py",
    "test_dashboards.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _stat(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) of `pid`, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    name, rest = text.split(" (", 1)[1].rsplit(")", 1)
    return name, int(rest.split()[1])


def _in_cluster(pid: int) -> bool:
    while pid > 1 and (stat := _stat(pid)) is not None:
        if stat[0] in CLUSTER_PROCESSES:
            return True
        pid = stat[1]
    return False


def session_processes() -> set[int]:
    """The live processes this pytest process started, directly or not (found by PROCESS_MARK)."""
    mark = f"{PROCESS_MARK}={os.getpid()}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        pid = int(entry)
        if not _process_gone(pid) and not _in_cluster(pid):
            found.add(pid)
    return found


@pytest.fixture(autouse=True)
def leaves_no_process_behind():
    """Fail a test that leaves a process running (after 10 s of grace for processes still exiting),
    and kill what it left. The zygote lives for the session; fixtures of a wider scope are set up
    before this runs, so their processes are not the test's."""
    before = session_processes()
    yield
    left = session_processes() - before - ({Zygote._proc.pid} if Zygote._proc is not None else set())
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {pid for pid in left if not _process_gone(pid)}
    if not left:
        return
    described = []
    for pid in sorted(left):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            described.append(f"{pid}: {command}")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    pytest.fail("the test left processes running (now killed):\n  " + "\n  ".join(described))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's in-process models (OMP_NUM_THREADS may say otherwise): CI has
    2 cores and other work beside, where a second intra-op thread mostly spins."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


class Zygote:
    """tests/zygote.py, started on first use in this pytest process: forks ranks that need no imports."""

    _proc: subprocess.Popen | None = None
    _outputs = Path(tempfile.mkdtemp(prefix="salnet-forked-"))  # each child's stdout, stderr and exit status
    _count = 0
    atexit.register(shutil.rmtree, _outputs, ignore_errors=True)

    @classmethod
    def fork(cls, args, env, cwd) -> tuple[int, Path]:
        """Start `python ARGS...` as a fork of the zygote; its pid and the folder of its stdout, stderr and rc."""
        if cls._proc is None or cls._proc.poll() is not None:
            cls._proc = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "zygote.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=python_env(),
                cwd=REPO,
            )
            atexit.register(cls._proc.stdin.close)  # its end of input ends it (and any rank left running)
        cls._count += 1
        folder = cls._outputs / str(cls._count)
        folder.mkdir()
        request = {"argv": list(map(str, args)), "env": python_env(env), "cwd": str(cwd), "rc": str(folder / "rc")}
        for stream in ("out", "err"):
            request[stream] = str(folder / stream)
        cls._proc.stdin.write(json.dumps(request) + "\n")
        cls._proc.stdin.flush()
        reply = cls._proc.stdout.readline()
        if not reply:
            pytest.fail(f"tests/zygote.py ended (status {cls._proc.wait()}): see the test's captured stderr")
        return json.loads(reply)["pid"], folder


class Forked:
    """`python ARGS...` forked by the zygote: the part of subprocess.Popen's interface the tests use
    (pid, poll, wait, communicate, send_signal, kill, terminate, returncode; output as text)."""

    def __init__(self, args, env=None, cwd=REPO):
        self.args = list(args)
        self.pid, self._folder = Zygote.fork(args, env, cwd)
        self.returncode = None

    def poll(self):
        rc = self._folder / "rc"
        if self.returncode is None and rc.exists():
            self.returncode = int(rc.read_text())
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def output(self):
        """(stdout, stderr) so far."""
        return tuple(
            (self._folder / stream).read_text() if (self._folder / stream).exists() else "" for stream in ("out", "err")
        )

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.output()

    @property
    def stdout(self):
        return io.StringIO(self.output()[0])

    @property
    def stderr(self):
        return io.StringIO(self.output()[1])

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)


def forked_run(args, env=None, timeout=120, cwd=REPO, check=True):
    """run_py's result for `python ARGS...`, forked by the zygote (no imports to pay): for the tests
    whose subject is the run, not the start of a Python process."""
    proc = Forked(args, env, cwd)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(30)
        pytest.fail(f"still running after {timeout} s: {args}\n--- stdout\n{out}\n--- stderr\n{err}")
    out, err = proc.output()
    if check and proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {args}\n--- stdout\n{out}\n--- stderr\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ranks(nproc, args, env=None, timeout=180, check=True, grace_s=30):
    """What `torchrun --nproc_per_node N ARGS...` runs, without torchrun: N ranks (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT on a free local port) forked by the zygote. As torchrun's agent does, the first
    rank to fail ends the others (after `grace_s`, the time salnet's own failure handling gets); the
    result is the first failure's status, stdout and stderr of every rank (a file each rank appends to).
    Tests about torchrun itself (its agent, restarts, signals to it) use torchrun."""
    port = str(free_port())
    group = [
        Forked(
            args,
            {
                **(env or {}),
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(nproc)
    ]
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in group):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in group):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace_s):
            for p in group:
                p.kill()
            if now > deadline:
                outs = [p.communicate(30) for p in group]
                pytest.fail(f"ranks still running after {timeout} s: {args}\n" + "\n".join(o + e for o, e in outs))
        time.sleep(0.02)
    codes = [p.returncode for p in group]
    code = next((c for c in codes if c != 0), 0)
    outs = [p.output() for p in group]
    out, err = "".join(o for o, _ in outs), "".join(e for _, e in outs)
    if check and code != 0:
        pytest.fail(f"ranks failed {codes}: {args}\n--- stdout\n{out}\n--- stderr\n{err}")
    return subprocess.CompletedProcess(args, code, out, err)


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
