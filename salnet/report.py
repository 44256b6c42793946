"""`python -m salnet.report runs/NAME`: a run at a glance, running or finished, with or without W&B.

    python -m salnet.report runs/demo              # draw runs/demo/plots/ again, print the summary
    python -m salnet.report runs/demo --no-plots   # the summary only
    python -m salnet.report runs/demo --html       # and runs/demo/report/index.html, a page to open

It reads only the run directory: metrics.jsonl, config.yaml, plots/latest.npz (the newest
validation's curves and prediction panels, written by the run) and the names of the checkpoints.
The summary: steps done, training time over all attempts, throughput, the best validation of each
val set, the latest validation, where best.pt and the plots are. --html also writes the run's page,
runs/NAME/report/index.html (salnet.pages.run: the summary, validation history, training loss, the
latest validation's curves and pictures; it opens from disk, no network) and prints its path.

A run directory is read as it is found, damaged or not: whatever cannot be read (a bad line of
metrics.jsonl, a row that is not a record, an unreadable config.yaml or latest.npz, a file where
plots/ should be) is left out of the summary and named on one line of its own (file, and line
number where there is one); the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from salnet.config import MEAN_OVER_SETS, Config, ConfigError, load_config
from salnet.metrics import is_better
from salnet.run.rundir import RunDir
from salnet.run.runlog import format_duration, format_metrics_table
from salnet.run.state import Best

PROG = "python -m salnet.report"


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _record_problem(record) -> str | None:
    """Why a metrics.jsonl row is not a record salnet writes ({"kind": ..., "step": N, NAME: number, ...}), or None."""
    if not isinstance(record, dict):
        return f"not a record but a JSON {type(record).__name__}"
    if not isinstance(record.get("step"), int) or isinstance(record["step"], bool) or record["step"] < 0:
        return f"no step (a whole number >= 0): {json.dumps(record)[:80]}"
    if not isinstance(record.get("kind"), str):
        return f"no kind ('train' or 'val'): {json.dumps(record)[:80]}"
    wrong = [k for k, v in record.items() if k not in ("kind", "step") and not _is_number(v)]
    if wrong:
        return f"{', '.join(repr(k) for k in wrong)} not a number"
    if record["kind"] == "val" and not any("/" in k for k in record):
        return "a validation row without SET/METRIC values"
    return None


def read_log(path: Path) -> tuple[list[dict], list[str]]:
    """(the readable records of metrics.jsonl, one line per row that is not one). Unlike training's
    reader (salnet.run.rundir.read_records, which refuses a damaged file), this one reads around the
    damage: the report shows what there is. A torn last line (a crash mid-write) is ignored, as
    everywhere."""
    if not path.exists():
        return [], []
    try:
        data = path.read_bytes()
    except OSError as e:
        return [], [f"{path}: cannot be read ({e.strerror})"]
    records, problems = [], []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):  # the piece after the last newline: torn
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{path}, line {number}: not a JSON record ({getattr(e, 'msg', e)}), left out")
            continue
        why = _record_problem(record)
        if why:
            problems.append(f"{path}, line {number}: {why}, left out")
        else:
            records.append(record)
    return records, problems


def training_time(records: list[dict]) -> tuple[float, int]:
    """(seconds, attempts): each attempt's clock (a train record's elapsed_s) starts again at zero,
    so the run's time is the sum of each attempt's last reading."""
    clocks: list[float] = []
    for r in records:
        if r.get("kind") == "train" and _is_number(r.get("elapsed_s")):
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


def _config(run: RunDir, problems: list[str]) -> Config | None:
    if not run.config.exists():
        return None
    try:
        return load_config(str(run.config))
    except ConfigError as e:  # an older, foreign or damaged config: the summary makes do with the records
        problems.append(f"{run.config}: " + "; ".join(line.strip() for line in str(e).splitlines()))
        return None


def summary(run_dir: Path, problems: list[str] | None = None) -> str:
    """The summary of what can be read; what cannot is appended to `problems`, one line each."""
    from salnet.validate import best_key

    problems = [] if problems is None else problems
    run = RunDir(run_dir)
    records, unreadable = read_log(run.metrics)
    problems += unreadable
    cfg = _config(run, problems)
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
    speeds = [r["images_per_s"] for r in trains if _is_number(r.get("images_per_s"))]
    if speeds:
        waits = [r["data_wait"] for r in trains if _is_number(r.get("data_wait"))] or [0.0]
        memory = max((r["peak_mem_mib"] for r in trains if _is_number(r.get("peak_mem_mib"))), default=0)
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
        if best:
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
        if overall:  # (a log whose rows lack the best metric has no best to show)
            lines.append("")
            latest = {k: v for k, v in vals[-1].items() if k not in ("kind", "step")}
            lines.append(format_metrics_table(vals[-1]["step"], latest, Best(key, overall[key], overall["step"])))
    else:
        lines.append("  no validation yet")
    wandb_runs = sorted({p.name.rsplit("-", 1)[-1] for p in run.wandb.glob("*run-*")})
    if wandb_runs:
        lines.append(f"W&B: run id {', '.join(wandb_runs)}, local files in {run.wandb}")
    return "\n".join(lines)


def read_latest(run: RunDir, problems: list[str]):
    """(step, details) of plots/latest.npz, or None where there is none or it cannot be read (then named in `problems`)."""
    from salnet.run import plots

    path = run.plots / plots.LATEST
    if not path.exists():
        return None
    try:
        return plots.load_latest(path)
    except Exception as e:  # a damaged archive fails in zipfile, numpy or json, each its own way
        problems.append(
            f"{path}: unreadable ({type(e).__name__}: {e}); curves and pictures of the latest validation not drawn"
        )
        return None


def write_html(run_dir: Path, summary_text: str, problems: list[str]) -> Path:
    """runs/NAME/report/index.html from what can be read (salnet.pages.run); returns its path."""
    from salnet.pages.run import write_run_page

    run = RunDir(run_dir)
    latest = read_latest(run, problems)
    return write_run_page(run_dir / "report", f"run {run_dir.name}", summary_text, read_log(run.metrics)[0], latest)


def redraw(run_dir: Path, problems: list[str] | None = None) -> list[Path]:
    """Draw runs/NAME/plots/ again from metrics.jsonl and plots/latest.npz, what of them can be read;
    what cannot is appended to `problems`, one line each."""
    from salnet.run import plots

    problems = [] if problems is None else problems
    run = RunDir(run_dir)
    if run.plots.exists() and not run.plots.is_dir():
        problems.append(f"{run.plots}: a file where the plots directory should be; nothing drawn")
        return []
    try:
        return plots.render(run.plots, read_log(run.metrics)[0], read_latest(run, problems))
    except OSError as e:
        problems.append(f"{run.plots}: cannot draw there ({e.strerror})")
        return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/NAME)")
    parser.add_argument("--no-plots", action="store_true", help="print the summary only; leave plots/ as it is")
    parser.add_argument(
        "--html", action="store_true", help="also write RUN_DIR/report/index.html, the run's page, and print its path"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="RUN_DIR is a sweep's directory (launch/submit.py --sweep): one table of its cells, "
        "also written to RUN_DIR/sweep.csv and RUN_DIR/sweep.md",
    )
    parser.add_argument(
        "--sort",
        metavar="METRIC",
        help="with --sweep: best first by SET/METRIC, or METRIC of the primary set (default: eval.best_metric)",
    )
    args = parser.parse_args(argv)
    if args.sort and not args.sweep:
        parser.error("--sort applies to --sweep only")
    if args.sweep:
        from salnet.sweep_report import sweep_report_main

        sys.exit(sweep_report_main(args.run_dir, args.sort))
    run = RunDir(args.run_dir)
    if not run.metrics.is_file() and not run.config.is_file():
        print(f"{PROG}: neither {run.metrics} nor {run.config} found: not a salnet run directory", file=sys.stderr)
        sys.exit(2)
    problems: list[str] = []
    if not args.no_plots:
        written = redraw(args.run_dir, problems)
        print(f"plots: drew {len(written)} files in {run.plots}")
    text = summary(args.run_dir, problems)
    print(text)
    if not run.metrics.is_file():
        print(f"  nothing logged yet ({run.metrics} not found)")
    if args.html:
        try:
            print(f"page: {write_html(args.run_dir, text, problems)}")
        except OSError as e:
            problems.append(f"{args.run_dir / 'report'}: cannot write the page there ({e.strerror})")
    for problem in dict.fromkeys(problems):  # redraw and summary both read metrics.jsonl: each line once
        print(f"{PROG}: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
