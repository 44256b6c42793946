"""Stop requests: Slurm's warning signal, preemption, `scancel`, and the death of the launcher.

A long job rarely ends on its own: it meets its time limit, is preempted, or is cancelled. Slurm
announces each of these with a signal to every process of the job step, and the training loop must
then stop *with every rank at the same step*, save a checkpoint there and leave. Doing that inside a
signal handler races the other ranks (the handler runs between two bytecodes of whatever the
rank was doing, in the middle of a collective perhaps), so the handlers here only record the signal;
the loop asks `requested` at the end of each optimizer step, the ranks agree (one all-reduce), all
save at that step, and exit with `exit_code()`:

    EXIT_REQUEUE (75)  stopped on a warning (SIGUSR1/SIGUSR2: time limit or preemption ahead, or the
                       launcher died), checkpoint saved: requeue me and I resume
    EXIT_STOPPED (76)  stopped on SIGTERM (`scancel`, or the end of the job), checkpoint saved: do not
                       requeue, so a user's `scancel` never brings the job back

Before the ranks' first step (`exit_at_once()` until `defer()`) there is nothing to save: a stop
signal exits at once with the same codes, the newest checkpoint unchanged.

A crash exits with any other non-zero code and never looks like a stop.

Ctrl-C (SIGINT) is SIGTERM's interactive twin: saved at the next step end, exit 76. A second stop
signal of the user's (Ctrl-C again) does not wait: KeyboardInterrupt at once.

Before the ranks' first agreement there is nothing to save, so until then (`exit_at_once()` ...
`defer()`) a stop signal, or the launcher's death, ends the process at once with the same exit code
(SystemExit raised by the handler), instead of being kept for a step that may never come: a rank
whose launcher died during the rendezvous would otherwise wait out the collective timeout.

The death of the parent (torchrun's agent, which dies of an unhandled SIGUSR1/SIGUSR2, or slurmstepd)
is turned into SIGUSR1 by the kernel (`prctl(PR_SET_PDEATHSIG)`), so an orphaned rank saves and
leaves like one that got the warning, instead of training on with nobody to report to.

Loader workers and helper processes must not react to these signals at all (Slurm signals every
process of the step): they call `ignore_stop_signals()` (e.g. as the DataLoader's worker_init_fn).

No torch here: this module is imported by the Slurm launcher and by the job before anything heavy.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

EXIT_REQUEUE = 75  # "stopped on the warning signal, checkpoint saved, requeue me" (sysexits' EX_TEMPFAIL)
EXIT_STOPPED = 76  # "stopped on SIGTERM, checkpoint saved, do not requeue"

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
PARENT_DEATH_SIGNAL = signal.SIGUSR1

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2

_DESCRIPTIONS = {
    signal.SIGUSR1: "SIGUSR1 (a warning: Slurm's --signal=USR1 before the time limit or preemption)",
    signal.SIGUSR2: "SIGUSR2 (Slurm's warning before the time limit or preemption)",
    signal.SIGTERM: "SIGTERM (scancel, or the end of the job: stop without requeue)",
    signal.SIGINT: "SIGINT (Ctrl-C: stop without requeue; a second Ctrl-C stops at once)",
}

Handler = Callable[[int, Any], Any] | int | signal.Handlers | None


def _prctl(option: int, arg: int) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    result = libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0)
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg}) failed: {os.strerror(err)}")
    return result


def parent_death_signal() -> int:
    """The signal the kernel sends this process when its parent dies (0: none). Linux only."""
    if not sys.platform.startswith("linux"):
        return 0
    value = ctypes.c_int(0)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0) != 0:
        return 0
    return value.value


def started_by_launcher(environ=os.environ) -> bool:
    """Whether a launcher whose death should stop this process started it: torchrun (its agent sets
    TORCHELASTIC_RUN_ID), or any parent that is not init (slurmstepd, a shell, a test)."""
    return "TORCHELASTIC_RUN_ID" in environ or os.getppid() != 1


def _process_gone(pid: int) -> bool:
    """Whether `pid` has exited: no such process, or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


class StopRequest:
    """Records the first stop signal (SIGUSR1, SIGUSR2, SIGTERM, SIGINT) this process receives.

        stop = StopRequest().install()      # or: with StopRequest() as stop:
        ...
        if stop.requested: ...              # agree across ranks first, then save and
        sys.exit(stop.exit_code())          # 75 (requeue me) or 76 (do not requeue)

    The handlers only record the signal; nothing else happens inside them. `install()` also asks the
    kernel to send SIGUSR1 when the parent dies (Linux, when a launcher started the process; see
    `started_by_launcher`). A StopRequest installed while another one is installed (e.g. the training
    loop's inside salnet.slurm's) takes over what the earlier one saw, so a signal that arrived during
    start-up is not lost; `uninstall()` puts the previous handlers back.
    """

    def __init__(self, parent_death: bool | None = None):
        self._signum: int | None = None
        self._parent_died = False
        self._previous: dict[int, Handler] = {}
        self._installed = False
        self._want_parent_death = parent_death  # None: decide at install() time
        self._armed_parent_death = False
        self._prev_pdeathsig = 0
        self._ppid: int | None = None
        self._at_once = False

    # ---- the handler: record, nothing more (but at start-up, and on a second Ctrl-C) -----------

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._signum is not None:
            raise KeyboardInterrupt  # Ctrl-C while the stop is under way: the user will not wait for the save
        if self._signum is None:  # the first signal decides; later ones change nothing
            self._signum = signum
        if self._at_once:
            self._exit_now()

    def _exit_now(self) -> None:
        print(f"{self.describe()} before the first step: nothing to save, stopping now", file=sys.stderr, flush=True)
        raise SystemExit(self.exit_code())

    def exit_at_once(self) -> StopRequest:
        """Until `defer()`: a stop signal ends the process at once (SystemExit with `exit_code()`, from the
        handler), and one that came before this call ends it now. For start-up, before the ranks' first
        agreement, when there is nothing to save. Returns self."""
        self._at_once = True
        if self._signum is not None:
            self._exit_now()
        return self

    def defer(self) -> None:
        """From now on a stop signal is only recorded, for the ranks to agree on at the next step end."""
        self._at_once = False

    # ---- life cycle ---------------------------------------------------------------------------

    def install(self) -> StopRequest:
        """Install the handlers (main thread only, as Python requires). Returns self."""
        if self._installed:
            return self
        previous = {}
        try:
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, self._handle)
        except ValueError as e:  # "signal only works in main thread of the main interpreter"
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            raise RuntimeError(f"StopRequest.install() must run in the main thread: {e}") from None
        self._previous = previous
        self._installed = True
        for handler in previous.values():
            owner = getattr(handler, "__self__", None)
            if (
                isinstance(owner, StopRequest)
                and owner is not self
                and owner._signum is not None
                and self._signum is None
            ):
                self._signum, self._parent_died = owner._signum, owner.parent_died
        kill_daemonic_children_at_exit()  # this process's loader workers ignore SIGTERM
        want = self._want_parent_death if self._want_parent_death is not None else started_by_launcher()
        if want and sys.platform.startswith("linux"):
            self._arm_parent_death()
        return self

    def _arm_parent_death(self) -> None:
        before = os.getppid()
        self._prev_pdeathsig = parent_death_signal()
        try:
            _prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL))
        except OSError:
            return  # not available (e.g. a sandbox without prctl): the signals still work
        self._armed_parent_death = True
        self._ppid = before
        if os.getppid() != before and self._signum is None:
            # The parent died between the two reads: the kernel had no one to watch any more.
            self._signum, self._parent_died = int(PARENT_DEATH_SIGNAL), True
            if self._at_once:
                self._exit_now()

    def uninstall(self) -> None:
        """Put back the handlers (and the parent-death signal) that were there before install()."""
        if not self._installed:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        self._installed = False
        if self._armed_parent_death:
            try:
                _prctl(_PR_SET_PDEATHSIG, self._prev_pdeathsig)
            except OSError:
                pass
            self._armed_parent_death = False

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ---- what was asked ------------------------------------------------------------------------

    @property
    def signum(self) -> int | None:
        """The first stop signal seen (signal.SIGUSR1, SIGUSR2 or SIGTERM), None if none."""
        return self._signum

    @property
    def requested(self) -> bool:
        return self._signum is not None

    @property
    def parent_died(self) -> bool:
        """Whether the stop came from the parent's death (SIGUSR1 while the parent is gone).

        Judged when asked, not in the handler: some kernels (gVisor's) deliver the parent-death
        signal before the orphan is handed to its new parent, so getppid() inside the handler can
        still name the dead parent."""
        if self._parent_died:
            return True
        if self._signum != PARENT_DEATH_SIGNAL or self._ppid is None:
            return False
        return os.getppid() != self._ppid or _process_gone(self._ppid)

    @property
    def parent_death_armed(self) -> bool:
        """Whether the kernel will send SIGUSR1 when the parent dies."""
        return self._armed_parent_death

    def exit_code(self) -> int:
        """EXIT_STOPPED (76) after SIGTERM or SIGINT, EXIT_REQUEUE (75) after SIGUSR1/SIGUSR2 or the parent's death,
        0 when no signal was seen (a rank that stops because another rank was signalled: agree on the
        code across ranks with a max, so that a SIGTERM anywhere means "do not requeue")."""
        if self._signum is None:
            return 0
        return EXIT_STOPPED if self._signum in (signal.SIGTERM, signal.SIGINT) else EXIT_REQUEUE

    def describe(self) -> str:
        if self._signum is None:
            return "no stop signal"
        if self.parent_died:
            return "SIGUSR1 (the parent process, the launcher, died)"
        return _DESCRIPTIONS.get(self._signum, signal.Signals(self._signum).name)


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """Ignore SIGUSR1, SIGUSR2, SIGTERM and SIGINT in this process: for DataLoader workers (it can be the
    worker_init_fn itself) and helper processes, which Slurm signals along with the training process
    but which must leave when the training process tells them to, not before.

    The parent must then not rely on SIGTERM to end them: multiprocessing's exit hook terminates
    daemonic children with SIGTERM and joins them, which would wait forever (a crashed rank whose
    loader iterator is still referenced would never exit). `StopRequest.install()` registers
    `kill_daemonic_children_at_exit` in the parent for that; a parent without a StopRequest calls it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_EXIT_HOOK_PID: int | None = None


def _kill_daemonic_children() -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:  # DataLoader workers; multiprocessing would terminate() them next anyway
            child.kill()


def kill_daemonic_children_at_exit() -> None:
    """At interpreter exit, SIGKILL this process's daemonic multiprocessing children (loader workers
    that ignore SIGTERM) before multiprocessing's own exit hook terminates and joins them. Once per process."""
    global _EXIT_HOOK_PID
    if _EXIT_HOOK_PID == os.getpid():
        return
    import multiprocessing.util  # noqa: F401  (registers its exit hook now, so ours, registered after, runs first)

    atexit.register(_kill_daemonic_children)
    _EXIT_HOOK_PID = os.getpid()
