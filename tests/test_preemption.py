"""salnet.run.preemption with real signals: os.kill to this process, to subprocesses, and a real torchrun
whose agent dies (its workers must learn of it through the parent-death signal)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from salnet.run.preemption import EXIT_REQUEUE, EXIT_STOPPED, StopRequest, _process_gone, parent_death_signal

from conftest import REPO, Forked, free_port, spawn_torchrun

LINUX = sys.platform.startswith("linux")


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def stop():
    request = StopRequest().install()
    yield request
    request.uninstall()


def test_exit_codes_are_distinct_and_not_crash_codes():
    assert (EXIT_REQUEUE, EXIT_STOPPED) == (75, 76)
    assert StopRequest().exit_code() == 0 and StopRequest().describe() == "no stop signal"


@pytest.mark.parametrize(
    "sig, code, words",
    [
        (signal.SIGUSR2, EXIT_REQUEUE, "SIGUSR2 (Slurm's warning before the time limit or preemption)"),
        (signal.SIGUSR1, EXIT_REQUEUE, "SIGUSR1 (a warning"),
        (signal.SIGTERM, EXIT_STOPPED, "SIGTERM (scancel"),
        (signal.SIGINT, EXIT_STOPPED, "SIGINT (Ctrl-C"),
    ],
)
def test_a_signal_is_recorded_not_acted_on(stop, sig, code, words):
    assert not stop.requested and stop.signum is None
    os.kill(os.getpid(), sig)
    assert wait_for(lambda: stop.requested)  # the process is alive: the handler only recorded it
    assert stop.signum == sig and stop.exit_code() == code
    assert stop.describe().startswith(words) and not stop.parent_died


def test_a_second_ctrl_c_stops_at_once(stop):
    os.kill(os.getpid(), signal.SIGINT)  # the first: saved at the next step end, as SIGTERM
    assert wait_for(lambda: stop.requested) and stop.exit_code() == EXIT_STOPPED
    with pytest.raises(KeyboardInterrupt):  # the second: now
        os.kill(os.getpid(), signal.SIGINT)
        wait_for(lambda: False, timeout=2)


def test_before_the_first_agreement_a_stop_signal_ends_the_process_at_once(stop):
    stop.exit_at_once()
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGUSR2)
        wait_for(lambda: False, timeout=2)
    assert e.value.code == EXIT_REQUEUE
    nested = StopRequest().install()  # takes over the signal seen so far
    with pytest.raises(SystemExit):  # one seen before exit_at_once() ends it then
        nested.exit_at_once()
    nested.uninstall()
    stop.defer()  # from the first agreement on: recorded only
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert stop.signum == signal.SIGUSR2 and stop.exit_code() == EXIT_REQUEUE


def test_the_first_signal_decides(stop):
    os.kill(os.getpid(), signal.SIGUSR2)
    assert wait_for(lambda: stop.requested)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stop.signum == signal.SIGUSR2 and stop.exit_code() == EXIT_REQUEUE


def test_uninstall_restores_the_previous_handlers():
    seen = []
    previous = {
        sig: signal.signal(sig, lambda s, f: seen.append(s)) for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
    }
    try:
        stop = StopRequest().install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wait_for(lambda: stop.requested) and seen == []
        stop.uninstall()
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            os.kill(os.getpid(), sig)
        assert wait_for(lambda: len(seen) == 3) and seen == [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_nested_request_takes_over_a_signal_seen_during_start_up():
    outer = StopRequest().install()  # e.g. salnet.slurm's, before the training loop exists
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert wait_for(lambda: outer.requested)
        with StopRequest() as inner:  # the training loop's
            assert inner.signum == signal.SIGUSR2 and inner.exit_code() == EXIT_REQUEUE
        assert signal.getsignal(signal.SIGUSR2) == outer._handle
    finally:
        outer.uninstall()


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only")
def test_parent_death_signal_is_armed_and_disarmed(stop):
    assert os.getppid() != 1 and stop.parent_death_armed
    assert parent_death_signal() == signal.SIGUSR1
    stop.uninstall()
    assert parent_death_signal() == 0
    with StopRequest(parent_death=False) as unarmed:
        assert not unarmed.parent_death_armed and parent_death_signal() == 0


SURVIVOR = textwrap.dedent("""
    import os, signal, sys, time
    from salnet.run.preemption import ignore_stop_signals
    if sys.argv[1] == "ignore":
        ignore_stop_signals()
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        os.kill(os.getpid(), sig)
        time.sleep(0.05)
    print("survived")
""")


@pytest.mark.parametrize("mode", ["ignore", "default"])
def test_ignore_stop_signals_keeps_a_helper_process_alive(mode):
    proc = subprocess.run([sys.executable, "-c", SURVIVOR, mode], cwd=REPO, capture_output=True, text=True, timeout=60)
    if mode == "ignore":
        assert proc.returncode == 0 and proc.stdout.strip() == "survived", proc.stderr
    else:  # the control: without it, the first signal (SIGUSR1) kills the process
        assert proc.returncode == -signal.SIGUSR1 and "survived" not in proc.stdout


# A worker that installs StopRequest, says so, then "trains" until a stop is requested and exits with
# the exit code, after writing what it saw to OUT.<rank>.
WORKER = textwrap.dedent("""
    import os, sys, time
    from salnet.run.preemption import StopRequest
    stop = StopRequest().install()
    rank = os.environ.get("RANK", "0")
    # One write of the whole line: two ranks share the pipe, and print() writes the newline apart.
    os.write(1, f"ready {os.getpid()} armed={stop.parent_death_armed}\\n".encode())
    deadline = time.monotonic() + 60
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(f"{sys.argv[1]}.{rank}", "w") as f:
        f.write(f"{stop.signum} {stop.exit_code()} {stop.parent_died} {stop.describe()}")
    sys.exit(stop.exit_code())
""")

# The parent: starts the worker, waits until it is ready, then dies without a word.
PARENT = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
    print(child.stdout.readline().strip(), flush=True)
    import os
    os._exit(0)
""")


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only")
def test_the_death_of_the_parent_acts_like_a_warning(tmp_path):
    out = tmp_path / "seen"
    proc = subprocess.run(
        [sys.executable, "-c", PARENT, WORKER, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.startswith("ready") and "armed=True" in proc.stdout, proc.stderr
    assert wait_for(lambda: (tmp_path / "seen.0").exists(), timeout=20), (
        "the orphaned worker never learned that its parent died"
    )
    signum, code, parent_died, described = (tmp_path / "seen.0").read_text().split(" ", 3)
    assert (int(signum), int(code), parent_died) == (signal.SIGUSR1, EXIT_REQUEUE, "True")
    assert described == "SIGUSR1 (the parent process, the launcher, died)"


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only")
def test_torchrun_workers_stop_when_usr2_kills_the_agent(tmp_path):
    # torchrun's agent handles only TERM/INT/HUP/QUIT: SIGUSR2 (Slurm's warning, sent to every
    # process of the step) kills it outright. Its workers must still save and ask to be requeued.
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "seen"
    agent = spawn_torchrun(2, [script, out], env={"PYTHONPATH": str(REPO)})
    try:
        ready = [agent.stdout.readline() for _ in range(2)]
        assert all(line.startswith("ready") and "armed=True" in line for line in ready), ready
        agent.send_signal(signal.SIGUSR2)
        assert agent.wait(timeout=30) == -signal.SIGUSR2
        for rank in (0, 1):
            assert wait_for(lambda: (tmp_path / f"seen.{rank}").exists(), timeout=20), f"rank {rank} kept running"  # noqa: B023
            signum, code, parent_died, _ = (tmp_path / f"seen.{rank}").read_text().split(" ", 3)
            assert (int(signum), int(code), parent_died) == (signal.SIGUSR1, EXIT_REQUEUE, "True")
    finally:
        agent.kill()
        for line in ready if "ready" in locals() else []:
            pid = int(line.split()[1])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# A parent whose daemonic child (a loader worker) ignores SIGTERM, then fails: multiprocessing's exit
# hook would terminate() the child with SIGTERM and join it forever, unless the parent installed a
# StopRequest (which kills such children first).
CRASHING_PARENT = textwrap.dedent("""
    import multiprocessing, sys, time
    from salnet.run.preemption import StopRequest, ignore_stop_signals

    def worker():
        ignore_stop_signals()
        time.sleep(600)

    if __name__ == "__main__":
        if sys.argv[1] == "stop":
            StopRequest().install()
        child = multiprocessing.Process(target=worker, daemon=True)
        child.start()
        time.sleep(0.3)
        print(child.pid, flush=True)
        raise SystemExit(1)  # e.g. a rank that failed, its loader still alive
""")


@pytest.mark.parametrize("mode", ["stop", "control"])
def test_a_failing_parent_exits_although_its_workers_ignore_sigterm(tmp_path, mode):
    script = tmp_path / "parent.py"
    script.write_text(CRASHING_PARENT)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    child = int(proc.stdout.readline())
    try:
        if mode == "stop":
            assert proc.wait(timeout=20) == 1
            assert wait_for(lambda: _process_gone(child)), "the worker outlived its parent"
        else:  # without the exit hook the parent waits for its child forever
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=4)
    finally:
        for pid in (proc.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


# A rank that will never meet its peers (WORLD_SIZE 2, nobody else): it waits in the rendezvous.
def lone_rank_env():
    return {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }


def kill_if_alive(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_the_rendezvous_ends_the_rank_at_once(tmp_path, sig):
    rank = Forked(["-m", "salnet.train", f"out_dir={tmp_path}"], env=lone_rank_env())
    try:
        time.sleep(2)  # in the rendezvous, blocked in C++ (the store's connect retries)
        assert rank.poll() is None, rank.output()
        rank.send_signal(sig)
        assert rank.wait(timeout=20) == EXIT_STOPPED
        assert "before the first step: nothing to save, stopping now" in rank.output()[1]
    finally:
        kill_if_alive(rank.pid)


# The launcher (this script) starts a rank and dies while the rank waits in the rendezvous.
DYING_LAUNCHER = textwrap.dedent("""
    import os, runpy, sys, time
    rank = os.fork()
    if rank == 0:
        sys.argv = ["salnet.train", sys.argv[1]]
        try:
            runpy.run_module("salnet.train", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
    print(rank, flush=True)
    time.sleep(2)
    os._exit(0)
""")


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_rank_whose_launcher_dies_during_the_rendezvous_ends_at_once(tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(DYING_LAUNCHER)
    launcher = Forked([script, f"out_dir={tmp_path}"], env=lone_rank_env())
    assert launcher.wait(timeout=30) == 0, launcher.output()
    rank = int(launcher.output()[0].split()[0])
    try:
        assert wait_for(lambda: _process_gone(rank), timeout=20), "the orphaned rank kept waiting for its rendezvous"
        assert "SIGUSR1 (the parent process, the launcher, died) before the first step" in launcher.output()[1]
    finally:
        kill_if_alive(rank)
