#!/usr/bin/env python
"""Submit a salnet training run to Slurm (Submitit): one task per GPU, no torchrun inside.

    python launch/submit.py --nodes 4 --config configs/duts_r50.yaml
    python launch/submit.py --nodes 2 --gpus-per-node 0 --tasks-per-node 1 --time 30 --config X.yaml train.steps=100
    python launch/submit.py --dry-run --nodes 4 --config configs/duts_r50.yaml    # print, submit nothing
    python launch/submit.py --sweep optim.lr=1e-3,3e-3 --sweep loss.kind=bce_iou,structure --config X.yaml
                                                    # a sweep: one job array (launch/sweep_submit.py)

Takes the same `--config FILE key=value ...` as `python -m salnet.train`, plus the Slurm flags below.
Before submitting it validates the config (a typo fails here, exit status 2, not in the queue),
makes data and output paths absolute, checks the shard manifests and the pretrained-weights cache,
says whether the run resumes and from which step, and writes the fully resolved config into
runs/NAME/slurm/; the job runs that copy, so editing configs/X.yaml later changes nothing for
a queued or requeued job.

Every job: --requeue, USR2 to every task --signal-delay seconds before the time limit (and on
preemption, where the cluster sends the user signal), logs appended under runs/NAME/slurm/, a job
name per run with --dependency=singleton (two jobs never write one run directory), and a clean
environment (no RANK/SLURM_* of the submitting shell). On the warning the training saves a checkpoint
at a step all ranks agree on and rank 0 requeues the job (at most --max-requeues times); the next
attempt resumes. A plain `scancel` saves and does not requeue.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:
    import salnet  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salnet.config import Config, ConfigError, add_config_arguments, check_runnable, load_config, to_yaml  # noqa: E402
from salnet.fsio import atomic_write  # noqa: E402
from salnet.run.rundir import RunDir  # noqa: E402
from salnet.run.wandb_run import new_run_id  # noqa: E402
from salnet.slurm import DEFAULT_MAX_REQUEUES, TrainJob  # noqa: E402
from salnet.sweep import MAX_CELLS  # noqa: E402

PROG = "python launch/submit.py"
EXIT_USAGE = 2

# sbatch options this launcher sets itself: --slurm must not change them behind its back.
OWNED = {
    "signal": "--signal-delay",
    "requeue": "(always on)",
    "job-name": "(one name per run)",
    "output": "(runs/NAME/slurm/)",
    "error": "(runs/NAME/slurm/)",
    "open-mode": "(always append)",
    "nodes": "--nodes",
    "ntasks-per-node": "--tasks-per-node",
    "gpus-per-node": "--gpus-per-node",
    "cpus-per-task": "--cpus-per-task",
    "mem": "--mem-gb",
    "time": "--time",
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
    "exclude": "--exclude",
    "comment": "--comment",
    "no-requeue": "(requeue is how a stopped job continues)",
    "array": "(one job per run)",
}
# Variables of the submitting shell that would make the job believe it is another job's rank.
DIST_NAMES = ("GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "LOCAL_WORLD_SIZE")


class SubmitError(Exception):
    """Something the user must fix before the job can be submitted; the message says what."""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def at_least(minimum: int):
    """An argparse type: an integer >= minimum (a size or count of 0 or below is refused, not written as is)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def slurm_minutes(text: str) -> int:
    """Slurm's time formats to whole minutes (rounded up, as Slurm does): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"--time {text!r}: expected minutes (90) or Slurm's [D-]H:MM:SS (1:30:00, 2-00:00:00)"
        )
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b) if b else None, int(c) if c else None
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    minutes = -(-seconds // 60)
    if minutes < 1:
        raise argparse.ArgumentTypeError(f"--time {text!r} is shorter than a minute")
    return minutes


def key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-")
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
        raise argparse.ArgumentTypeError(
            f"--slurm {text!r}: expected an sbatch option as KEY=VALUE or KEY (e.g. mail-type=END, exclusive)"
        )
    key = key.replace("_", "-")
    return key, (value if sep else True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    s = parser.add_argument_group("Slurm job shape (one task per GPU)")
    s.add_argument("--nodes", type=at_least(1), default=1, help="nodes (default 1)")
    s.add_argument(
        "--gpus-per-node",
        type=at_least(0),
        default=8,
        help="GPUs per node, one task each (default 8); 0: a CPU job (gloo) with --tasks-per-node tasks per node",
    )
    s.add_argument(
        "--tasks-per-node",
        type=at_least(1),
        default=None,
        help="tasks per node: must equal --gpus-per-node for a GPU job; for a CPU job default 1",
    )
    s.add_argument(
        "--cpus-per-task",
        type=at_least(1),
        default=None,
        help="CPUs per task, for its loader workers (given to srun too: Slurm 22.05-23.02 no longer passes it on)",
    )
    s.add_argument(
        "--mem-gb", type=positive_number, default=None, help="memory per node in GB (default: the cluster's)"
    )
    s.add_argument(
        "--time",
        type=slurm_minutes,
        default=None,
        metavar="MIN|[D-]H:MM:SS",
        help="time limit: minutes, or Slurm's [D-]H:MM:SS (default: the partition's)",
    )
    s.add_argument("--partition", help="partition")
    s.add_argument("--account", help="account to charge")
    s.add_argument("--qos", help="quality of service")
    s.add_argument("--constraint", help="node features, e.g. 'a100&ib'")
    s.add_argument("--exclude", help="nodes not to use, e.g. 'gpu[01-03]'")
    s.add_argument("--comment", help="job comment")
    s.add_argument(
        "--slurm",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, repeatable: --slurm mail-type=END --slurm exclusive",
    )
    s.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="CMD",
        help="a line the job script runs before srun (module load, source venv/bin/activate), repeatable",
    )
    p = parser.add_argument_group("stopping and requeueing")
    p.add_argument(
        "--signal-delay",
        type=at_least(1),
        default=180,
        metavar="SECONDS",
        help="USR2 reaches every task this long before the time limit (default 180; Slurm may send it up to 60 s early); "
        "the training saves at the next step and requeues the job",
    )
    p.add_argument(
        "--max-requeues",
        type=at_least(0),
        default=DEFAULT_MAX_REQUEUES,
        help=f"requeues the job may ask for (default {DEFAULT_MAX_REQUEUES})",
    )
    p.add_argument(
        "--srun-wait",
        type=at_least(1),
        default=120,
        metavar="SECONDS",
        help="after the first task exits, srun ends the others after this long (default 120): "
        "a crash on one rank ends the job in bounded time",
    )
    r = parser.add_argument_group("this command")
    r.add_argument(
        "--fresh",
        action="store_true",
        help="start the run over: the job's first attempt removes the run's checkpoints and best.pt (train.resume=none) "
        "and gets a new W&B run; requeued attempts resume as always",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch script and the resolved config; submit nothing, write nothing",
    )
    r.add_argument("--follow", action="store_true", help="after submitting, stream rank 0's log until the job ends")
    w = parser.add_argument_group("sweeps: one Slurm job array, one run per cell, in <out_dir>/SWEEP/CELL")
    w.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="sweep a config key over these values (parsed as key=value overrides are), repeatable: the product",
    )
    w.add_argument(
        "--sweep-file", type=Path, metavar="YAML", help="a sweep file: grid: (key -> values) and/or cells: (explicit)"
    )
    w.add_argument(
        "--sweep-name", help="the sweep's directory under out_dir (default: the file's name:, else the config's name)"
    )
    w.add_argument(
        "--max-parallel",
        type=at_least(1),
        default=None,
        metavar="N",
        help="at most N cells run at once (--array=0-K%%N)",
    )
    w.add_argument("--yes", action="store_true", help=f"submit a sweep of more than {MAX_CELLS} cells")
    return add_config_arguments(parser)


# --------------------------------------------------------------------------------------------
# The config, resolved for the job
# --------------------------------------------------------------------------------------------


def is_local(location: str) -> bool:
    return not (location.startswith("pipe:") or "://" in location)


def absolute(location: str, base: Path) -> str:
    if location.startswith("file://") or not is_local(location):
        return location
    path = Path(location).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def weights_is_path(weights: str) -> bool:
    if weights in ("imagenet", "none"):
        return False
    return (
        "/" in weights
        or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))
        or Path(weights).expanduser().exists()
    )


def resolve(cfg: Config, base: Path, fresh: bool) -> Config:
    """The config the job runs: every local path absolute, train.resume=none with --fresh."""
    tree = cfg.model_dump(mode="json")
    tree["out_dir"] = absolute(tree["out_dir"], base)
    tree["data"]["train"] = [absolute(x, base) for x in tree["data"]["train"]]
    val = tree["data"]["val"]  # a list (one set), or named sets {SET: [dirs]}
    tree["data"]["val"] = (
        {name: [absolute(x, base) for x in locs] for name, locs in val.items()}
        if isinstance(val, dict)
        else [absolute(x, base) for x in val]
    )
    weights = tree["model"]["backbone"]["weights"]
    if weights_is_path(weights):
        tree["model"]["backbone"]["weights"] = absolute(weights, base)
    if tree["train"]["resume"] not in ("auto", "none"):
        tree["train"]["resume"] = absolute(tree["train"]["resume"], base)
    if fresh:
        tree["train"]["resume"] = "none"
    return Config.model_validate(tree)


def with_wandb_id(cfg: Config, wandb_id: str) -> Config:
    """The config with log.wandb_id preset, so the job's first attempt creates the W&B run the
    launcher printed; its checkpoints keep it from then on (salnet.run.wandb_run.choose_run_id)."""
    if cfg.log.wandb_id:
        return cfg
    tree = cfg.model_dump(mode="json")
    tree["log"]["wandb_id"] = wandb_id
    return Config.model_validate(tree)


def check(cfg: Config) -> list[str]:
    """Check what the job would otherwise find broken only once it runs. Returns notes; raises SubmitError."""
    from salnet.shards.manifest import ShardsError, load_manifest

    notes, errors = [], []
    if (cfg.train.steps is None) == (cfg.train.epochs is None):
        errors.append(
            f"set exactly one of train.steps and train.epochs (got train.steps={cfg.train.steps}, train.epochs={cfg.train.epochs})"
        )
    for key, location in cfg.data.sources():
        if not is_local(location) or location.startswith("file://"):
            notes.append(f"{key} {location}: remote, its manifest is read when the job starts")
            continue
        try:
            manifest = load_manifest(location)
        except ShardsError as e:
            errors.append(f"{key} {location}: {e}")
            continue
        notes.append(f"{key} {location}: {manifest['total_samples']} samples in {len(manifest['shards'])} shard(s)")
    weights = cfg.model.backbone.weights
    if weights_is_path(weights):
        if not Path(weights).is_file():
            errors.append(f"model.backbone.weights={weights!r}: no such file")
        else:
            notes.append(f"model.backbone.weights {weights}: found")
    elif weights != "none":
        from salnet.model.weights import cache_path, torchvision_weights  # torch + torchvision: only when needed

        entry = torchvision_weights(cfg.model.backbone.name, weights)
        if entry is None:
            errors.append(
                f"model.backbone.weights={weights!r} is neither 'imagenet', 'none', a torchvision weights name of "
                f"{cfg.model.backbone.name} nor an existing file"
            )
        else:
            path = cache_path(entry)
            if path.is_file():
                notes.append(f"model.backbone.weights={weights} ({entry}): cached at {path}")
            else:
                errors.append(
                    f"model.backbone.weights={weights!r}: {cfg.model.backbone.name}'s {entry} is not cached at {path} "
                    f"(compute nodes often have no network); fetch it first:\n"
                    f"      curl -fL --create-dirs -o {shlex.quote(str(path))} {entry.url}"
                )
    if errors:
        raise SubmitError("cannot submit:\n  " + "\n  ".join(errors))
    return notes


def resume_plan(cfg: Config) -> str:
    run = RunDir(cfg.run_dir)
    found = run.complete_checkpoints()
    newest = f"step {run.checkpoint_step(found[-1])} ({found[-1]})" if found else None
    if cfg.train.resume == "none":
        if found or run.best.exists():
            return (
                f"starts over (train.resume=none): the job removes {len(found)} checkpoint(s) (newest {newest}) and best.pt "
                f"of {run} when it starts"
            )
        return "starts from step 0 (train.resume=none; nothing to remove)"
    if cfg.train.resume == "auto":
        return f"resumes from {newest}" if found else f"starts from step 0 (no checkpoint in {run.checkpoints})"
    path = Path(cfg.train.resume)
    step = run.checkpoint_step(path)
    if not path.is_dir() or step is None:
        raise SubmitError(
            f"train.resume={cfg.train.resume!r} is not a complete checkpoint directory "
            f"(expected .../checkpoints/step-NNNNNNNN); valid values: 'auto', 'none' or such a path"
        )
    return f"resumes from step {step} ({path})"


def wandb_plan(cfg: Config, run: RunDir, fresh: bool) -> tuple[str, str, bool]:
    """(run id, what to print, whether the id is new). The launcher remembers the id it wrote into
    the run's configs (RunDir.launcher_wandb_id), so every submit of the run names the same W&B run,
    also before the first checkpoint keeps it; --fresh starts a new one. The job reads only log.wandb_id."""
    id_file = run.launcher_wandb_id
    known = id_file.read_text().strip() if id_file.is_file() and not fresh else ""
    preset = cfg.log.wandb_id  # set by the user in the config: that id, always
    wandb_id = preset or known or new_run_id()
    known = known if not preset else preset
    if not cfg.log.wandb:
        return wandb_id, "off (log.wandb=false)", not known
    where = f"project {cfg.log.project}" + (f", entity {cfg.log.entity}" if cfg.log.entity else "")
    url = f" https://wandb.ai/{cfg.log.entity}/{cfg.log.project}/runs/{wandb_id}" if cfg.log.entity else ""
    return wandb_id, f"run id {wandb_id} ({where}; {'continues' if known else 'new'}){url}", not known


# --------------------------------------------------------------------------------------------
# The Slurm job
# --------------------------------------------------------------------------------------------


def job_name(cfg: Config) -> str:
    # The name is what --dependency=singleton keys on: one per run directory (not just per run name).
    digest = hashlib.sha1(str(cfg.run_dir).encode()).hexdigest()[:6]
    return f"salnet-{cfg.name}-{digest}"


def sbatch_parameters(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """Submitit's SlurmExecutor parameters (also what --dry-run renders)."""
    gpus = args.gpus_per_node
    tasks = args.tasks_per_node if args.tasks_per_node is not None else (gpus or 1)
    if gpus and tasks != gpus:
        raise SubmitError(
            f"--tasks-per-node {tasks} with --gpus-per-node {gpus}: salnet runs one task per GPU "
            f"(omit --tasks-per-node, or use --gpus-per-node 0 for a CPU job)"
        )
    if args.nodes < 1 or tasks < 1:
        raise SubmitError(f"--nodes {args.nodes} --tasks-per-node {tasks}: both must be >= 1")
    extra: dict[str, Any] = {"requeue": True, "dependency": "singleton"}
    for key, value in args.slurm:
        if key in OWNED:
            raise SubmitError(f"--slurm {key}=...: set by this launcher ({OWNED[key]}); use that flag instead")
        if key == "dependency":  # the user's dependency and singleton must both hold
            value = f"singleton,{value}"
        extra[key] = value
    srun_args = [f"--wait={args.srun_wait}", "--kill-on-bad-exit=0"]
    params: dict[str, Any] = {
        "job_name": job_name(cfg),
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "signal_delay_s": args.signal_delay,
        "wckey": None,  # Submitit's default --wckey=submitit breaks clusters that check wckeys
        "additional_parameters": extra,
        "srun_args": srun_args,
        "setup": [
            "# salnet: one thread per CPU of the task; the job must not think it is another job's rank",
            "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
            *args.setup,
        ],
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
        srun_args.insert(0, f"--cpus-per-task={args.cpus_per_task}")
    if args.mem_gb:
        from submitit.slurm.slurm import _convert_mem

        params["mem"] = _convert_mem(args.mem_gb)  # 32 -> "32GB", 0.5 -> "512MB"
    # None when --time is not given: Submitit then writes no --time line and the partition's limit holds
    # (left out, Submitit would ask for its own default of 5 minutes).
    params["time"] = args.time
    if args.time:
        if args.signal_delay >= args.time * 60:
            raise SubmitError(
                f"--signal-delay {args.signal_delay} s is not shorter than --time ({args.time} min): "
                f"the warning would come before the job starts"
            )
    for name in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    check_one_line(params)
    return params


def check_one_line(params: dict[str, Any]) -> None:
    """SubmitError if a value bound for the job script holds a control character: a newline in
    `--comment $'x\n#SBATCH --exclusive'` (or in the run's name, a --slurm value, a --setup line) would
    add lines of its own to the script."""
    named = [("--setup", line) for line in params["setup"]] + [("srun", arg) for arg in params["srun_args"]]
    named += [(f"--slurm {key}", f"{key}={value}") for key, value in params["additional_parameters"].items()]
    named += [
        ("the job name (from the config's name)" if key == "job_name" else f"--{key.replace('_', '-')}", value)
        for key, value in params.items()
        if key not in ("setup", "srun_args", "additional_parameters")
    ]
    for where, value in named:
        text = str(value)
        bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise SubmitError(
                f"{where} {text!r} holds the control character {bad!r}: each value is one line of the job script "
                f"(a newline would add lines of its own); give it on one line"
            )


def sbatch_text(params: dict[str, Any], folder: Path) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    # The command line Submitit's SlurmExecutor puts after srun (its _submitit_command_str).
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)


@contextlib.contextmanager
def clean_environment():
    """Submitit's clean_env (no SLURM_*, SUBMITIT_*, RANK, WORLD_SIZE, MASTER_*, LOCAL_RANK) plus torchrun's
    other variables; SLURM_CONF survives, since it says which cluster to submit to."""
    import submitit

    conf = os.environ.get("SLURM_CONF")
    extra = [k for k in os.environ if k.startswith("TORCHELASTIC_")] + [k for k in DIST_NAMES if k in os.environ]
    with submitit.helpers.clean_env(extra_names=extra):
        if conf:
            os.environ["SLURM_CONF"] = conf
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)


def squeue(*args: str) -> list[str]:
    proc = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=60)
    return proc.stdout.split() if proc.returncode == 0 else []


def job_state(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once Slurm has forgotten the job)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return {}
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


def follow(job: str, log: Path, poll_s: float = 2.0) -> int:
    """Print rank 0's log as it grows until the job has left the queue; 0 if it completed."""
    offset = 0
    print(f"following {log} (Ctrl-C stops following; the job keeps running)", flush=True)
    try:
        while True:
            running = bool(squeue("-j", job, "-o", "%T"))
            if log.is_file():
                with open(log, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            if not running:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job} keeps running (scancel {job} stops it)")
        return 130
    info = job_state(job)
    state, code = info.get("JobState", "unknown (Slurm has forgotten it)"), info.get("ExitCode", "?")
    print(f"job {job} ended: {state} (exit code {code})")
    return 0 if state == "COMPLETED" else 1


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def fail(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.sweep or args.sweep_file:
        from sweep_submit import submit_sweep  # launch/sweep_submit.py, next to this file

        return submit_sweep(args, sys.modules[__name__])
    base = Path.cwd()
    try:
        cfg = resolve(load_config(args.config, args.overrides), base, args.fresh)
        check_runnable(cfg, cuda=args.gpus_per_node > 0)  # the job's GPUs, not this machine's
        params = sbatch_parameters(args, cfg)
        notes = check(cfg)
        resume = resume_plan(cfg)
    except ConfigError as e:
        fail(str(e))
    except SubmitError as e:
        fail(str(e))

    run_dir = RunDir(cfg.run_dir)
    slurm_dir = run_dir.slurm
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    config_path = run_dir.submitted_config(stamp)
    n = 1
    while config_path.exists():  # two submits within a second
        n += 1
        config_path = run_dir.submitted_config(f"{stamp}-{n}")
    wandb_id, wandb_line, new_id = wandb_plan(cfg, run_dir, args.fresh)
    cfg = with_wandb_id(cfg, wandb_id)
    job = TrainJob(["--config", str(config_path)], max_requeues=args.max_requeues)
    tasks = params["ntasks_per_node"] * params["nodes"]
    shape = f"{params['nodes']} node(s) x {params['ntasks_per_node']} task(s) = {tasks} rank(s), " + (
        f"{args.gpus_per_node} GPU(s) per node (nccl)" if args.gpus_per_node else "CPU (gloo)"
    )
    waiting_for = [j for j in squeue("-n", params["job_name"], "-o", "%i")] if not args.dry_run else []

    if args.dry_run:
        print(f"# {PROG} --dry-run: nothing submitted, nothing written")
        print(f"# job:       {params['job_name']}: {shape}")
        print(f"# run dir:   {run_dir}")
        print(f"# config:    {config_path} (written at submit time; the job runs this copy)")
        print(f"# resume:    {resume}")
        print(f"# requeues:  at most {args.max_requeues}; USR2 {args.signal_delay} s before the time limit")
        print(f"# W&B:       {wandb_line}")
        for note in notes:
            print(f"# checked:   {note}")
        print(f"# each task: {job!r}")
        print("# ---- sbatch script " + "-" * 60)
        print(sbatch_text(params, slurm_dir))
        print("# ---- resolved config (" + str(config_path) + ") " + "-" * 20)
        sys.stdout.write(to_yaml(cfg))
        return 0

    import submitit

    slurm_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(config_path) as f:
        f.write(to_yaml(cfg))
    if new_id:
        with atomic_write(run_dir.launcher_wandb_id) as f:
            f.write(wandb_id + "\n")
    executor = submitit.SlurmExecutor(folder=slurm_dir)
    executor.update_parameters(**params)
    with clean_environment():
        try:
            submitted = executor.submit(job)
        except Exception as e:  # sbatch's own message says what the cluster refused
            fail(f"sbatch refused the job: {e}")
    jid = submitted.job_id
    log = slurm_dir / f"{jid}_0_log.out"
    print(f"submitted job {jid} ({params['job_name']}): {shape}")
    if waiting_for:
        print(f"  waits for:     job(s) {', '.join(waiting_for)} of the same run (--dependency=singleton)")
    print(f"  run directory: {run_dir}")
    print(f"  config:        {config_path} (the job runs this copy)")
    print(f"  resume:        {resume}")
    print(f"  rank-0 log:    {log} (stderr: {log.with_suffix('.err')}; rank r: {jid}_r_log.*)")
    print(f"  W&B:           {wandb_line}")
    print(f"  watch:         squeue -j {jid}    tail -f {shlex.quote(str(log))}")
    print(
        f"  cancel:        scancel {jid}    (saves a checkpoint, no requeue; scancel --signal=USR2 {jid}: saves and requeues)"
    )
    sys.stdout.flush()
    if args.follow:
        return follow(jid, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
