"""`launch/submit.py --sweep ...`: a sweep as one Slurm job array, one task per cell (salnet.sweep has the cells).

    python launch/submit.py --sweep optim.lr=1e-3,3e-3 --sweep loss.kind=bce,structure --max-parallel 4 \\
        --nodes 1 --gpus-per-node 8 --config configs/duts_r50.yaml
    python launch/submit.py --sweep-file sweep.yaml --dry-run --config X.yaml    # the cells, their configs

Every cell's config is built and checked (as submit.py checks one run's) before anything is written
or submitted; the first bad one is named. Each cell runs in <out_dir>/SWEEP/CELL from its own
resolved config copy (CELL/slurm/config-*.yaml), as a task of one array whose logs are
SWEEP/slurm/ARRAYJOB_TASK_RANK_log.{out,err}; every task has the job shape of the Slurm flags.

Submitting the same sweep again submits only what is left: done cells are skipped, cells still in the
queue (pending, running, waiting for a requeue) are left to their task, failed and unfinished ones
resume from their newest checkpoint (train.resume=auto unless the config says otherwise), new cells of
a changed grid start; cells no longer in the grid stay in the manifest (in_grid: false) with their run
directories, and are neither submitted nor removed.

USR2 to one task (`scancel --signal=USR2 ARRAYJOB_TASK`) saves that cell's run and requeues that task
alone (salnet.slurm requeues SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID); a task that fails ends only itself.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from salnet.config import Config, ConfigError, check_runnable, load_config, to_yaml
from salnet.fsio import atomic_write
from salnet.run.rundir import RunDir
from salnet.slurm import TrainJob
from salnet.sweep import (
    Cell,
    SweepDir,
    SweepError,
    build_cells,
    cell_config,
    check_sweep_name,
    merge_manifest,
    now,
    parse_sweep_arg,
    read_sweep_file,
    states,
)

SKIPPED = ("done", "running", "pending")  # a cell in one of these states is not submitted again


def read_cells(args) -> tuple[str | None, list[Cell]]:
    """(the sweep file's name, the cells) of --sweep-file and --sweep; SweepError for bad input."""
    file_name, grid, explicit = read_sweep_file(args.sweep_file) if args.sweep_file else (None, {}, [])
    for text in args.sweep:
        key, values = parse_sweep_arg(text)
        if key in grid:
            raise SweepError(f"--sweep {text!r}: {key} is swept twice (on the command line, or also in the sweep file)")
        grid[key] = values
    return file_name, build_cells(grid, explicit, allow_many=args.yes)


def with_group(cfg: Config, group: str) -> Config:
    """All cells in one W&B group, the sweep's name (log.group)."""
    tree = cfg.model_dump(mode="json")
    tree["log"]["group"] = group
    return Config.model_validate(tree)


def cell_configs(args, submit: ModuleType, cells: list[Cell], sweep_dir: SweepDir) -> dict[str, tuple[Config, str]]:
    """{cell: (its resolved config, its resume plan)}: every cell checked as submit.py checks one run."""
    base, checked = Path.cwd(), {}
    out = {}
    for cell in cells:
        where = f"cell {cell.name} [{cell.describe()}]"
        try:
            cfg = submit.resolve(cell_config(args.config, args.overrides, cell, sweep_dir.root), base, fresh=False)
            check_runnable(cfg, cuda=args.gpus_per_node > 0)
            # the data and weights checks read manifests and caches: once per distinct set of them
            inputs = json.dumps([cfg.data.sources(), cfg.model.backbone.weights, cfg.train.steps, cfg.train.epochs])
            if inputs not in checked:
                checked[inputs] = submit.check(cfg)
            out[cell.name] = (with_group(cfg, sweep_dir.root.name), submit.resume_plan(cfg))
        except (ConfigError, submit.SubmitError) as e:
            raise SweepError(f"{where}: {e}") from None
    return out


def array_parameters(args, submit: ModuleType, cfg: Config, sweep_dir: SweepDir, count: int) -> dict[str, Any]:
    """submit.py's job parameters for one task, as an array of `count` tasks named after the sweep. No
    --dependency=singleton: resubmitting never queues a cell that is still in the queue, so two arrays of
    one sweep never share a run directory, and new cells need not wait for the old array to end."""
    params = submit.sbatch_parameters(args, cfg)
    digest = hashlib.sha1(str(sweep_dir.root).encode()).hexdigest()[:6]  # two sweeps of one name, elsewhere
    params["job_name"] = f"salnet-sweep-{sweep_dir.root.name}-{digest}"
    extra = params["additional_parameters"]
    dependency = extra.pop("dependency").removeprefix("singleton").lstrip(",")
    if dependency:
        extra["dependency"] = dependency
    params["array_parallelism"] = min(args.max_parallel or count, count)
    return params


def submit_sweep(args, submit: ModuleType) -> int:
    """The sweep's cells as one job array (see the module docstring); `submit` is launch/submit.py's module."""
    try:
        if args.fresh:
            raise SweepError(
                "--fresh with a sweep: to start a cell over, remove its run directory (runs/SWEEP/CELL) and submit again"
            )
        if args.follow:
            raise SweepError("--follow with a sweep: watch it with python -m salnet.report --sweep runs/SWEEP")
        file_name, cells = read_cells(args)
        first = load_config(args.config, args.overrides)
        name = check_sweep_name(args.sweep_name or file_name or first.name)
        sweep_dir = SweepDir(Path(submit.absolute(first.out_dir, Path.cwd())) / name)
        sweep_dir.check_not_a_run()
        configs = cell_configs(args, submit, cells, sweep_dir)
        config_file = str(Path(args.config).resolve()) if args.config else None
        manifest = merge_manifest(sweep_dir.read(), name, config_file, args.overrides, cells, sweep_dir)
        found = states(sweep_dir, manifest["cells"], {c: cfg.train.steps for c, (cfg, _) in configs.items()})
        unknown = [c.name for c in cells if found[c.name][0] == "unknown"]
        if unknown:  # submitting them again could run a cell twice at once
            raise SweepError(
                f"squeue cannot say whether {', '.join(unknown)} of {sweep_dir.manifest} are still queued; "
                f"submit again once it answers"
            )
        todo = [c for c in cells if found[c.name][0] not in SKIPPED]
        params = array_parameters(args, submit, configs[cells[0].name][0], sweep_dir, max(len(todo), 1))
    except (ConfigError, SweepError, submit.SubmitError) as e:
        submit.fail(str(e))

    print(f"sweep {name}: {len(cells)} cell(s) in {sweep_dir.root}; {len(todo)} to submit")
    width, values_width = max(len(c.name) for c in cells), max(len(c.describe()) for c in cells)
    for cell in cells:
        state, progress = found[cell.name]
        plan = configs[cell.name][1] if cell in todo else f"skipped: {state}"
        print(f"  {cell.name:<{width}}  {cell.describe():<{values_width}}  {state:<11} step {progress['step']}: {plan}")
    removed = [e["name"] for e in manifest["cells"] if not e["in_grid"]]
    if removed:
        print(f"  not in the grid any more (kept, not submitted): {', '.join(removed)}")

    if args.dry_run:
        print(f"# {submit.PROG} --dry-run: nothing submitted, nothing written")
        if todo:
            if len(todo) > 1:  # Submitit submits a single task as a plain job, more as an array (--array=0-K%N)
                params["map_count"] = len(todo)
            print("# ---- sbatch script " + "-" * 60)
            print(submit.sbatch_text(params, sweep_dir.slurm))
        for cell in cells:
            print(f"# ---- cell {cell.name}: resolved config " + "-" * 20)
            sys.stdout.write(to_yaml(configs[cell.name][0]))
        return 0
    if not todo:
        print("nothing to submit")
        sweep_dir.write({**manifest, "updated": now()})
        return 0

    import submitit

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    jobs = []
    for cell in todo:
        cfg = configs[cell.name][0]
        run_dir = RunDir(cfg.run_dir)
        wandb_id, _, new_id = submit.wandb_plan(cfg, run_dir, fresh=False)
        cfg = submit.with_wandb_id(cfg, wandb_id)
        config_path = run_dir.submitted_config(stamp)
        with atomic_write(config_path) as f:
            f.write(to_yaml(cfg))
        if new_id:
            with atomic_write(run_dir.launcher_wandb_id) as f:
                f.write(wandb_id + "\n")
        jobs.append(TrainJob(["--config", str(config_path)], max_requeues=args.max_requeues))
    sweep_dir.slurm.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=sweep_dir.slurm)
    executor.update_parameters(**params)
    with submit.clean_environment():
        try:
            submitted = executor.submit_array(jobs)
        except Exception as e:  # sbatch's own message says what the cluster refused
            submit.fail(f"sbatch refused the job array: {e}")
    tasks = {cell.name: job.job_id for cell, job in zip(todo, submitted, strict=True)}
    for entry in manifest["cells"]:
        if entry["name"] in tasks:
            entry["tasks"].append({"task": tasks[entry["name"]], "submitted": now()})
        entry["state"] = "pending" if entry["name"] in tasks else found[entry["name"]][0]  # a snapshot
    sweep_dir.write({**manifest, "updated": now()})
    array = submitted[0].job_id.split("_")[0]
    print(
        f"submitted job array {array} ({params['job_name']}): {len(todo)} task(s), at most {params['array_parallelism']} at once"
    )
    for cell in todo:
        print(f"  {tasks[cell.name]:<12} {cell.name}")
    print(f"  manifest:      {sweep_dir.manifest}")
    print(f"  logs:          {sweep_dir.slurm}/ARRAYJOB_TASK_RANK_log.out")
    print(f"  watch:         squeue -j {array}    python -m salnet.report --sweep {shlex.quote(str(sweep_dir.root))}")
    print(f"  preempt one:   scancel --signal=USR2 {next(iter(tasks.values()))} (saves and requeues that task alone)")
    return 0
