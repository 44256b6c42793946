"""`python -m salnet.report runs/NAME`: a run at a glance, running or finished, with or without W&B.

    python -m salnet.report runs/demo              # draw runs/demo/plots/ again, print the summary
    python -m salnet.report runs/demo --no-plots   # the summary only

It reads only the run directory: metrics.jsonl (salnet.run.rundir.read_records), config.yaml,
plots/latest.npz (the newest validation's curves and prediction panels, written by the run) and
the names of the checkpoints. The summary: steps done, training time over all attempts,
throughput, the best validation of each val set, the latest validation, where best.pt and the
plots are.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from salnet.config import MEAN_OVER_SETS, Config, ConfigError, load_config
from salnet.metrics import is_better
from salnet.run.rundir import RunDir, read_records
from salnet.run.runlog import format_duration, format_metrics_table
from salnet.run.state import Best

PROG = "python -m salnet.report"


def training_time(records: list[dict]) -> tuple[float, int]:
    """(seconds, attempts): each attempt's clock (a train record's elapsed_s) starts again at zero,
    so the run's time is the sum of each attempt's last reading."""
    clocks: list[float] = []
    for r in records:
        if r.get("kind") == "train" and "elapsed_s" in r:
            if not clocks or r["elapsed_s"] < clocks[-1]:
                clocks.append(r["elapsed_s"])
            else:
                clocks[-1] = r["elapsed_s"]
    return sum(clocks), len(clocks)


def best_per_set(vals: list[dict], metric: str) -> dict[str, dict]:
    """For each val set, the val record where its `metric` was best."""
    best: dict[str, dict] = {}
    for r in vals:
        for key, value in r.items():
            set_name, _, name = key.rpartition("/")
            if name == metric and is_better(metric, value, best[set_name][key] if set_name in best else None):
                best[set_name] = r
    return best


def _config(run: RunDir) -> Config | None:
    try:
        return load_config(str(run.config))
    except ConfigError:
        return None  # an older or foreign config: the summary makes do with the records


def summary(run_dir: Path) -> str:
    from salnet.validate import best_key

    run = RunDir(run_dir)
    records = read_records(run.metrics)
    cfg = _config(run)
    trains = [r for r in records if r.get("kind") == "train"]
    vals = [r for r in records if r.get("kind") == "val"]
    step = max((r["step"] for r in records), default=0)
    total = cfg.train.steps if cfg else None
    lines = [f"run {run_dir}"]
    done = f"{step} of {total}" + (" (complete)" if step == total else "") if total else f"{step}"
    epoch = f", epoch {trains[-1]['epoch']}" if trains and "epoch" in trains[-1] else ""
    seconds, attempts = training_time(records)
    eta = (
        f", {format_duration(trains[-1]['eta_s'])} left at the last line"
        if trains and trains[-1].get("eta_s") and step != total
        else ""
    )
    lines.append(f"  steps       {done}{epoch}{eta}")
    lines.append(
        f"  time        {format_duration(seconds)} training over {attempts} attempt(s)"
        if attempts
        else "  time        not recorded"
    )
    speeds = [r["images_per_s"] for r in trains if "images_per_s" in r]
    if speeds:
        waits = [r["data_wait"] for r in trains if "data_wait" in r]
        memory = max((r.get("peak_mem_mib", 0) for r in trains), default=0)
        lines.append(
            f"  throughput  {statistics.median(speeds):.1f} img/s (median of {len(speeds)} train lines, all ranks), "
            f"data wait {statistics.median(waits):.0%}, peak memory {memory:.0f} MiB"
        )
    checkpoints = run.complete_checkpoints()
    lines.append(f"  checkpoint  {checkpoints[-1] if checkpoints else 'none'}")
    if vals:
        # Without a readable config: eval.best_metric's default, maxF of the mean over sets (of the
        # one set), if logged; else the first metric.
        logged = sorted(
            (k for k in vals[-1] if "/" in k and not k.endswith("/images")),
            key=lambda k: not k.startswith(f"{MEAN_OVER_SETS}/"),
        )
        key = best_key(cfg) if cfg else next((k for k in logged if k.endswith("/maxF")), logged[0])
        metric = key.rpartition("/")[2]
        best = best_per_set(vals, metric)
        overall = best.get(key.rpartition("/")[0])
        lines.append(
            f"  best.pt     {run.best if run.best.exists() else 'missing'}"
            + (f": {key}={overall[key]:.4f} @ step {overall['step']}" if overall else "")
        )
        lines.append("")
        lines.append(f"best validation of each set (by {metric}):")
        names = [
            k.rpartition("/")[2]
            for k in vals[-1]
            if k.rpartition("/")[2] != "images" and k.startswith(next(iter(best)) + "/")
        ]
        width = max(8, *(len(n) for n in best))
        lines.append(f"  {'set':<{width}} {'step':>6} " + " ".join(f"{n:>8}" for n in names))
        for set_name, r in best.items():
            lines.append(
                f"  {set_name:<{width}} {r['step']:>6} "
                + " ".join(f"{r.get(f'{set_name}/{n}', float('nan')):>8.4f}" for n in names)
            )
        lines.append("")
        latest = {k: v for k, v in vals[-1].items() if k not in ("kind", "step")}
        lines.append(format_metrics_table(vals[-1]["step"], latest, Best(key, overall[key], overall["step"])))
    else:
        lines.append("  no validation yet")
    wandb_runs = sorted({p.name.rsplit("-", 1)[-1] for p in run.wandb.glob("*run-*")})
    if wandb_runs:
        lines.append(f"W&B: run id {', '.join(wandb_runs)}, local files in {run.wandb}")
    return "\n".join(lines)


def redraw(run_dir: Path) -> list[Path]:
    """Draw runs/NAME/plots/ again from metrics.jsonl and plots/latest.npz."""
    from salnet.run import plots

    run = RunDir(run_dir)
    latest_path = run.plots / plots.LATEST
    latest = plots.load_latest(latest_path) if latest_path.exists() else None
    return plots.render(run.plots, read_records(run.metrics), latest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/NAME)")
    parser.add_argument("--no-plots", action="store_true", help="print the summary only; leave plots/ as it is")
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir)
    if not run.metrics.is_file():
        print(f"{PROG}: {run.metrics} not found: not a salnet run directory, or nothing logged yet", file=sys.stderr)
        sys.exit(2)
    if not args.no_plots:
        written = redraw(args.run_dir)
        print(f"plots: drew {len(written)} files in {run.plots}")
    print(summary(args.run_dir))


if __name__ == "__main__":
    main()
