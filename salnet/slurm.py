"""One Slurm task of a training job: the requeue protocol, in one place for both ways of submitting.

    python -m salnet.slurm [--max-requeues N] -- --config FILE [key=value ...]

Every task of the job (one per GPU, started by srun, no torchrun) runs this, with the training's
own command line after `--`. slurm/train.sbatch runs it through srun; launch/submit.py (Submitit)
pickles a `TrainJob`, which each task unpickles and calls. It holds only argv-like data (the
training command line and the requeue budget), so an old pickle never carries stale code, and
torch is imported only when the training starts.

    TrainJob(["--config", "runs/NAME/slurm/config-....yaml"], max_requeues=10)()

A call:
1. installs salnet's own stop handlers at once (salnet.run.preemption.StopRequest), replacing Submitit's
   USR2 handler, which on rank 0 would requeue the job and exit from inside the handler while the
   other ranks keep computing; the training loop's own StopRequest takes over any signal seen here;
2. runs `salnet.train`'s main in this process with the argv, adding `train.resume=auto` on a
   requeued attempt (SLURM_RESTART_COUNT > 0), whatever the config said, so a requeue never starts
   the run over;
3. when the training exits with EXIT_REQUEUE (75: stopped on the warning signal, with a checkpoint
   saved, or before its first step with nothing to save),
   rank 0 requeues the job with `scontrol requeue` (array-aware) while SLURM_RESTART_COUNT is below
   max_requeues; EXIT_STOPPED (76: SIGTERM) and failures are never requeued.
The task exits with the training's exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

from salnet.run.preemption import EXIT_REQUEUE, EXIT_STOPPED, StopRequest

PROG = "python -m salnet.slurm"
DEFAULT_MAX_REQUEUES = 10  # launch/submit.py --max-requeues, slurm/train.sbatch's SALNET_MAX_REQUEUES


class NotInSlurmJob(RuntimeError):
    """Run outside a Slurm job (no SLURM_JOB_ID)."""


def job_id(environ: Mapping[str, str] = os.environ) -> str:
    """The id `scontrol requeue` takes: ARRAYJOB_TASK inside an array, else the job id."""
    if environ.get("SLURM_ARRAY_TASK_ID") and environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    try:
        return environ["SLURM_JOB_ID"]
    except KeyError:
        raise NotInSlurmJob(
            f"SLURM_JOB_ID is not set: {PROG} runs as a task of a Slurm job "
            f"(submit it with launch/submit.py or slurm/train.sbatch)"
        ) from None


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many times Slurm has requeued this job (0 on the first attempt)."""
    try:
        return int(environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def attempt_argv(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """The training argv for this attempt: a requeued one always resumes (the last override wins)."""
    argv = list(argv)
    if restart_count(environ) > 0:
        argv.append("train.resume=auto")
    return argv


def exit_status(code: object) -> int:
    """sys.exit's argument as the process's exit status (None -> 0, a message -> 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    return 1


def _ignore_sigterm() -> None:
    # Run in scontrol's process before exec (an ignored signal stays ignored across exec): requeueing this
    # very job makes Slurm send SIGTERM to every process of the step, scontrol included, which then often
    # died (-15) after Slurm had done the requeue but before it could say so (seen on array tasks).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def requeue(jid: str, timeout_s: float = 60) -> tuple[bool, str]:
    """`scontrol requeue JOB`; (done, what happened). Never a shell: the id is one argv item."""
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", jid], capture_output=True, text=True, timeout=timeout_s, preexec_fn=_ignore_sigterm
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"`scontrol requeue {jid}` could not run: {e}"
    if proc.returncode != 0:
        return False, f"`scontrol requeue {jid}` failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
    return True, f"requeued job {jid}"


class TrainJob:
    """One task of the job (see the module docstring); what Submitit pickles: argv-like data only."""

    def __init__(self, argv: Sequence[str], max_requeues: int = DEFAULT_MAX_REQUEUES):
        self.argv = [str(a) for a in argv]
        self.max_requeues = int(max_requeues)

    def __repr__(self) -> str:
        return f"TrainJob(argv={self.argv!r}, max_requeues={self.max_requeues})"

    def __call__(self) -> int:
        # First, before anything slow: Submitit's USR2 handler must never run (see the module docstring).
        # Left installed until the process ends, so a late signal cannot trigger Submitit's requeue either.
        stop = StopRequest().install()
        env = os.environ
        rank = int(env.get("SLURM_PROCID", "0") or 0)
        restarts = restart_count(env)
        jid = job_id(env)
        # One intra-op thread per CPU Slurm gave the task (torch would otherwise use every core of the node).
        env.setdefault("OMP_NUM_THREADS", env.get("SLURM_CPUS_PER_TASK") or "1")
        argv = attempt_argv(self.argv, env)

        def say(text: str) -> None:
            if rank == 0:
                print(f"salnet.slurm: {text}", flush=True)

        say(
            f"job {jid}, attempt {restarts + 1} (restarts so far: {restarts}, at most {self.max_requeues}); "
            f"{env.get('SLURM_NTASKS', '1')} task(s) on {env.get('SLURM_JOB_NODELIST', '?')}"
        )
        say("python -m salnet.train " + " ".join(argv))
        if stop.requested:
            say(
                f"{stop.describe()} arrived during start-up; the training stops before its first step (nothing to save)"
            )

        from salnet import train  # the entry point (it imports torch once the config is read)

        code = 0
        try:
            train.main(argv)
        except SystemExit as e:
            code = exit_status(e.code)
        if code != 0:  # in each rank's own log: which rank stopped how
            print(
                f"salnet.slurm: rank {rank} exits with status {code}"
                + {
                    EXIT_REQUEUE: " (stopped on the warning signal)",
                    EXIT_STOPPED: " (stopped on SIGTERM)",
                }.get(code, " (failed)"),
                flush=True,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        if code == EXIT_REQUEUE and rank == 0:
            if restarts < self.max_requeues:
                done, what = requeue(jid)
                say(
                    f"stopped on the warning signal; {what} (restart {restarts + 1} of at most {self.max_requeues})"
                    if done
                    else f"stopped on the warning signal, but NOT requeued: {what}"
                )
            else:
                say(
                    f"stopped on the warning signal; not requeued: {restarts} restart(s) reached "
                    f"--max-requeues={self.max_requeues} (submit the run again to continue)"
                )
        elif code == EXIT_STOPPED:
            say("stopped on SIGTERM; not requeued (scancel or the end of the job)")
        if code != 0:
            sys.exit(code)
        return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [--max-requeues N] -- --config FILE [key=value ...]",
        description=__doc__.split("\n\n")[0],
        epilog="Everything after `--` is salnet.train's command line (python -m salnet.train --help).",
    )
    parser.add_argument(
        "--max-requeues",
        type=int,
        default=DEFAULT_MAX_REQUEUES,
        metavar="N",
        help=f"rank 0 requeues the job on exit 75 while Slurm's restart count is below N (default {DEFAULT_MAX_REQUEUES})",
    )
    parser.add_argument("train_argv", nargs="*", metavar="TRAIN_ARG", help="salnet.train's arguments, after `--`")
    args = parser.parse_args(argv)
    if args.max_requeues < 0:
        parser.error(f"--max-requeues {args.max_requeues}: expected an integer >= 0")
    try:
        TrainJob(args.train_argv, max_requeues=args.max_requeues)()
    except NotInSlurmJob as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
