"""A process that has imported torch and salnet once, and forks a fresh rank for each request.

Measured on this machine, starting a training rank costs about 5 CPU-seconds of imports (torch,
torchvision and with them torch._dynamo, which the optimizer's first step imports anyway) and a
torchrun agent 2-3 more, against well under a second for the tiny runs the tests train. The suite
starts well over a hundred such ranks; conftest's `ranks()` forks them from here instead, so each
pays only for its own work. What runs in the child is what `python -m MODULE ARGS` or
`python SCRIPT ARGS` runs: the entry point's own code, in a process of its own with its own
environment, working directory, stdout and stderr. The zygote is single-threaded, so a fork
copies no lock another thread holds. Tests that are about the process tree itself (torchrun's
agent, a launcher that dies, signals to a process group) start real interpreters instead.

Protocol (one JSON object per line): the test writes {"argv", "env", "cwd", "out", "err", "rc"} to
stdin; the zygote forks, answers {"pid": N} on stdout, and once the child has ended writes its
exit status (a negative number: the signal that ended it) to the file "rc" (whole, by rename).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys

# What a rank imports, imported once here (OMP_NUM_THREADS comes from conftest's python_env).
import torch  # noqa: F401

import salnet.strategy.zero  # noqa: F401  DeepSpeed (seconds more per rank; DS_ACCELERATOR=cpu is set there)
import salnet.train  # noqa: F401
import salnet.trainer  # noqa: F401  (train.main imports it once the config is read)


def run_child(request: dict) -> None:
    """In the forked child: become `python ARGV...` and exit with its status. Never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group, as a torchrun rank (and no terminal signal of the test's)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # What the interpreter does with PYTHONPATH at start-up (a test's own module, e.g. a model.factory).
        sys.path[1:1] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        argv = request["argv"]
        import runpy
        import warnings

        # runpy warns that the module was imported before it ran as __main__: here, on purpose.
        warnings.filterwarnings("ignore", message=".*found in sys.modules after import", category=RuntimeWarning)
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    running: dict[int, str] = {}  # pid -> its rc file
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.05)
        if ready:
            line = sys.stdin.readline()
            if not line:  # the test session ended
                break
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                run_child(request)
            running[pid] = request["rc"]
            print(json.dumps({"pid": pid}), flush=True)
        while running:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            rc = running.pop(pid, None)
            if log := os.environ.get("ZYGOTE_CPU_LOG"):  # for profiling the suite: CPU seconds per rank
                with open(log, "a") as f:
                    f.write(json.dumps({"rc": rc, "cpu_s": usage.ru_utime + usage.ru_stime}) + "\n")
            if rc is not None:
                with open(rc + ".tmp", "w") as f:
                    f.write(str(os.waitstatus_to_exitcode(status)))
                os.replace(rc + ".tmp", rc)
    for pid in running:  # a test left a rank running: end it with the session
        os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
