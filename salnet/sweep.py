"""Sweeps: a grid of config overrides, one run per cell, all in one directory with a manifest.

    python launch/submit.py --sweep optim.lr=1e-3,3e-3 --sweep loss.kind=bce,structure --config X.yaml
    python launch/submit.py --sweep-file sweep.yaml --max-parallel 8 --config X.yaml
    python -m salnet.report --sweep runs/SWEEP            # one table of every cell (salnet.sweep_report)

A sweep is the Cartesian product of the `--sweep KEY=V1,V2,...` value lists (and of a sweep file's
`grid:`), plus the sweep file's explicit `cells:`. Values parse as the config's `key=value`
overrides parse them (YAML: 3e-4, true, [1, 2], bce). Each cell is one run, runs/SWEEP/CELL, named
after its values (`optim.lr=0.01 loss.kind=bce` -> `lr0.01-kind_bce`): plain, readable, and usable as
a file, Slurm and W&B name. The sweep file:

    name: lr-loss                      # the sweep's name (default: the config's name)
    grid:                              # key -> list of values: their product
      optim.lr: [0.001, 0.003]
      loss.kind: [bce, structure]
    cells:                             # explicit cells, added to the grid's
      - {optim.lr: 0.01, loss.kind: bce}

runs/SWEEP/sweep.json (the manifest, written atomically) lists every cell: its values, run
directory and the array tasks it was submitted as. A cell's state is read from its run directory and
Slurm's queue whenever it is asked for, never trusted from the manifest (which keeps only a snapshot):
done (a complete checkpoint at the run's last step), running or pending (its array task is in the
queue), failed (it left the queue unfinished: a crash, scancel, or out of requeues), unsubmitted.

This module imports neither torch nor Slurm's clients at import time: launch/submit.py and
salnet.sweep_report (the table of salnet.report --sweep) both use it.
"""

from __future__ import annotations

import datetime
import difflib
import itertools
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from salnet.config import Config, ConfigError, describe_keys, load_config
from salnet.fsio import atomic_write
from salnet.run.rundir import RunDir, read_records

MANIFEST = "sweep.json"
MAX_CELLS = 1000  # more than this needs --yes: a typo in a grid should not queue ten thousand jobs
MAX_NAME = 120  # characters of a cell's name (a file name, a Slurm job's and a W&B run's)
RUN_DIR_KEYS = ("name", "out_dir")  # the sweep decides these: runs/SWEEP/CELL
STATES = ("done", "running", "pending", "failed", "unsubmitted")


class SweepError(ValueError):
    """A sweep the user must fix before anything is submitted; the message names the key, value or cell."""


# --------------------------------------------------------------------------------------------
# Keys and values
# --------------------------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """'0.1,0.2' -> ['0.1', '0.2']; commas inside [...], {...} or quotes belong to one value ('[1,2],[3,4]')."""
    items, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items]


def parse_value(text: str) -> Any:
    """One value as `key=text` on salnet.train's command line gives it (YAML; not YAML: the text)."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def check_key(key: str, where: str) -> None:
    """SweepError unless `key` is a setting of the config (a leaf, or a key under deepspeed:)."""
    if key in RUN_DIR_KEYS:
        raise SweepError(
            f"{where}: {key!r} cannot be swept: the sweep sets it (each cell runs in <out_dir>/SWEEP/CELL); "
            f"use --sweep-name for the sweep's directory"
        )
    leaves = [k for k, *_ in describe_keys()]
    if key in leaves or (key.startswith("deepspeed.") and len(key) > len("deepspeed.")):
        return
    sections = {leaf.rsplit(".", 1)[0] for leaf in leaves if "." in leaf}
    if key in sections:
        raise SweepError(f"{where}: {key!r} is a section, not a setting; sweep one of its keys ({key}.KEY)")
    close = difflib.get_close_matches(key, leaves, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise SweepError(f"{where}: unknown key {key!r}{hint} (python -m salnet.train --help lists the keys)")


def parse_sweep_arg(text: str) -> tuple[str, list[Any]]:
    """`--sweep KEY=V1,V2,...` -> (KEY, [values]); SweepError for an unknown key or an empty value."""
    key, sep, values = text.partition("=")
    key = key.strip()
    where = f"--sweep {text!r}"
    if not sep or not key:
        raise SweepError(f"{where}: expected KEY=V1,V2,... (e.g. --sweep optim.lr=1e-3,3e-3)")
    check_key(key, where)
    items = split_values(values)
    if not values.strip() or any(item == "" for item in items):
        raise SweepError(f"{where}: an empty value (expected KEY=V1,V2,... with at least one value, none empty)")
    return key, [parse_value(item) for item in items]


def read_sweep_file(path: Path) -> tuple[str | None, dict[str, list[Any]], list[dict[str, Any]]]:
    """(name, grid, explicit cells) of a sweep file; SweepError naming the file and the entry at fault."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise SweepError(f"--sweep-file {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise SweepError(f"--sweep-file {path}: not YAML ({e})") from None
    if not isinstance(data, dict) or not set(data) <= {"name", "grid", "cells"} or not data:
        raise SweepError(
            f"--sweep-file {path}: expected a mapping with grid: (key -> list of values) and/or cells: "
            f"(a list of key -> value mappings), optionally name:; got "
            + (f"the keys {', '.join(map(str, data))}" if isinstance(data, dict) else type(data).__name__)
        )
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise SweepError(f"--sweep-file {path}: name: must be a string, got {name!r}")
    grid, cells = data.get("grid") or {}, data.get("cells") or []
    if not isinstance(grid, dict):
        raise SweepError(f"--sweep-file {path}: grid: must map keys to lists of values, got {type(grid).__name__}")
    for key, values in grid.items():
        where = f"--sweep-file {path}: grid: {key}"
        check_key(str(key), where)
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: expected a non-empty list of values, got {values!r}")
    if not isinstance(cells, list) or not all(isinstance(c, dict) and c for c in cells):
        raise SweepError(f"--sweep-file {path}: cells: must be a list of non-empty key -> value mappings")
    for i, cell in enumerate(cells):
        for key in cell:
            check_key(str(key), f"--sweep-file {path}: cells[{i}]")
    return name, {str(k): v for k, v in grid.items()}, [{str(k): v for k, v in c.items()} for c in cells]


# --------------------------------------------------------------------------------------------
# Cells and their names
# --------------------------------------------------------------------------------------------


def value_text(value: Any) -> str:
    """A value as it reads in a name: 0.01, 1e-3, bce, true, 320_352."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "_".join(value_text(v) for v in value)
    if isinstance(value, dict):
        return "_".join(f"{k}_{value_text(v)}" for k, v in value.items())
    return str(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's last part (optim.lr -> lr), or more of it where two keys would read the same."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            candidate = "_".join(parts[-n:])
            if all(k == key or "_".join(k.split(".")[-n:]) != candidate for k in keys):
                break
        short[key] = candidate
    return short


def cell_name(values: dict[str, Any], short: dict[str, str]) -> str:
    """`{optim.lr: 0.01, loss.kind: bce}` -> 'lr0.01-kind_bce': a number follows its key directly, other
    values after '_'; anything but letters, digits, '.', '+', '_' becomes '_' (file, Slurm and W&B names)."""
    parts = []
    for key, value in values.items():
        text = value_text(value)
        joiner = "" if re.match(r"[-+.\d]", text) else "_"
        parts.append(short[key] + joiner + text)
    name = re.sub(r"[^A-Za-z0-9.+_-]+", "_", "-".join(parts))
    return re.sub(r"_+", "_", name).strip("._-") or "cell"


def override_text(value: Any) -> str:
    """A value as key=TEXT: plain where YAML reads the plain text back as it is (bce, 1e-3), else JSON."""
    if isinstance(value, str) and parse_value(value) == value:
        return value
    return json.dumps(value)


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: its values (key -> value, in the sweep's key order) and its name."""

    name: str
    values: dict[str, Any]

    def overrides(self) -> list[str]:
        """The values as salnet.train's key=value overrides, each reading back as given (JSON is YAML)."""
        return [f"{key}={override_text(value)}" for key, value in self.values.items()]

    def describe(self) -> str:
        return " ".join(f"{key}={value_text(value)}" for key, value in self.values.items())


def build_cells(grid: dict[str, list[Any]], explicit: list[dict[str, Any]], allow_many: bool = False) -> list[Cell]:
    """The grid's product, then the explicit cells, named; SweepError for no cells, more than MAX_CELLS
    without `allow_many`, or two cells with one name (the same values twice, or values that differ
    only in characters a name cannot hold)."""
    for key, values in grid.items():
        if not values:
            raise SweepError(f"--sweep {key}: an empty list of values (a sweep needs at least one)")
    product = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] if grid else []
    all_values = product + [dict(c) for c in explicit]
    if not all_values:
        raise SweepError("no cells: give --sweep KEY=V1,V2,... or a --sweep-file with grid: or cells:")
    if len(all_values) > MAX_CELLS and not allow_many:
        raise SweepError(
            f"{len(all_values)} cells ({' x '.join(str(len(v)) for v in grid.values()) or '0'} from the grid"
            f"{f' + {len(explicit)} explicit' if explicit else ''}): more than {MAX_CELLS}; add --yes if you mean it"
        )
    keys = list(dict.fromkeys(k for values in all_values for k in values))
    short = short_keys(keys)
    cells, seen = [], {}
    for values in all_values:
        cell = Cell(cell_name(values, short), values)
        if cell.name in seen:
            raise SweepError(
                f"two cells would be named {cell.name!r}: [{seen[cell.name].describe()}] and [{cell.describe()}]"
                + (
                    " (the same values twice)"
                    if seen[cell.name].values == values
                    else " (their values differ only in characters a name cannot hold)"
                )
                + "; every cell needs its own run directory"
            )
        if len(cell.name) > MAX_NAME:
            raise SweepError(
                f"cell [{cell.describe()}]: its name {cell.name[:40]!r}... is {len(cell.name)} characters, more than "
                f"{MAX_NAME}; sweep fewer keys per cell or shorter values"
            )
        seen[cell.name] = cell
        cells.append(cell)
    return cells


def cell_config(config: str | None, base: list[str], cell: Cell, sweep_dir: Path) -> Config:
    """The cell's config (defaults < file < base overrides < the cell's values; runs in sweep_dir/NAME);
    SweepError naming the cell if it does not validate."""
    overrides = [*base, *cell.overrides(), f"out_dir={json.dumps(str(sweep_dir))}", f"name={json.dumps(cell.name)}"]
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise SweepError(f"cell {cell.name} [{cell.describe()}]: {e}") from None


# --------------------------------------------------------------------------------------------
# The sweep directory and its manifest
# --------------------------------------------------------------------------------------------


def check_sweep_name(name: str) -> str:
    if not name or name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise SweepError(
            f"sweep name {name!r}: expected a plain directory name of letters, digits, '.', '_', '+', '-' "
            f"(it becomes <out_dir>/NAME and the Slurm job's name)"
        )
    return name


class SweepDir:
    """<out_dir>/SWEEP: one run directory per cell, slurm/ (the array's logs), sweep.json."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    def run_dir(self, cell_name: str) -> Path:
        return self.root / cell_name

    def check_not_a_run(self) -> None:
        """SweepError if the directory is one run's (a sweep would write its cells inside that run)."""
        run = RunDir(self.root)
        if run.metrics.exists() or run.checkpoints.exists() or run.config.exists():
            raise SweepError(
                f"{self.root} is a run directory (it holds {run.metrics.name}, {run.checkpoints.name}/ or "
                f"{run.config.name}), not a sweep's: choose another --sweep-name"
            )

    def read(self) -> dict[str, Any]:
        """The manifest ({} if there is none yet); SweepError if it is unreadable."""
        if not self.manifest.exists():
            return {}
        try:
            data = json.loads(self.manifest.read_text())
        except (OSError, ValueError) as e:
            raise SweepError(f"{self.manifest}: unreadable ({e}); move it aside to start the manifest over") from None
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
            raise SweepError(f"{self.manifest}: not a sweep manifest (no cells: list); move it aside")
        return data

    def write(self, data: dict[str, Any]) -> None:
        with atomic_write(self.manifest) as f:
            json.dump(data, f, indent=1)
            f.write("\n")


def merge_manifest(
    old: dict[str, Any], sweep: str, config: str | None, base: list[str], cells: list[Cell], sweep_dir: SweepDir
) -> dict[str, Any]:
    """The manifest for this submit: the current cells (their earlier submissions kept), then the cells
    of earlier submits that are no longer in the grid (in_grid: false; their run directories are left as
    they are, and they are not submitted again). SweepError if a name now means other values."""
    known = {c["name"]: c for c in old.get("cells", [])}
    entries = []
    for cell in cells:
        before = known.pop(cell.name, None)
        if before is not None and json.dumps(before.get("values"), sort_keys=True) != json.dumps(
            cell.values, sort_keys=True
        ):
            raise SweepError(
                f"cell {cell.name}: {sweep_dir.manifest} lists it with the values {before.get('values')}, "
                f"this sweep with {cell.values}; two value sets cannot share one run directory"
            )
        entries.append(
            {
                "name": cell.name,
                "values": cell.values,
                "run_dir": str(sweep_dir.run_dir(cell.name)),
                "in_grid": True,
                "tasks": (before or {}).get("tasks", []),
            }
        )
    for removed in known.values():
        entries.append({**removed, "in_grid": False})
    return {"sweep": sweep, "config": config, "overrides": base, "cells": entries}


# --------------------------------------------------------------------------------------------
# State: from the run directories and Slurm's queue
# --------------------------------------------------------------------------------------------


def queued_tasks(tasks: list[str]) -> dict[str, str] | None:
    """{ARRAYJOB_TASK: PENDING/RUNNING/...} of the tasks still in Slurm's queue; None if squeue cannot say."""
    jobs = sorted({t.split("_")[0] for t in tasks})
    if not jobs:
        return {}
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i %T"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # squeue refuses a list whose jobs it has all forgotten ("Invalid job id specified"): none queued
        return {} if "Invalid job id" in proc.stderr else None
    return dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)


def run_progress(run_dir: Path, total: int | None = None) -> dict[str, Any]:
    """What a run directory says: steps done, the last step (`total`, else the run's own config's), whether
    it finished, the val records."""
    run = RunDir(run_dir)
    try:
        records = read_records(run.metrics)
        problem = None
    except Exception as e:  # a damaged metrics.jsonl: the table says so, the other cells still show
        records, problem = [], f"{run.metrics}: {e}"
    try:
        cfg = load_config(str(run.config)) if run.config.exists() else None
    except ConfigError:
        cfg = None
    trains = [r for r in records if r.get("kind") == "train"]
    # The last step: train.steps, or (train.epochs) the step whose line says nothing is left.
    total = total or (cfg.train.steps if cfg else None)
    total = total or next((r["step"] for r in reversed(trains) if r.get("eta_s") == 0), None)
    saved = [RunDir.checkpoint_step(p) for p in run.complete_checkpoints()]
    return {
        "step": max((r["step"] for r in trains), default=0),
        "total": total,
        "finished": total is not None and any(s is not None and s >= total for s in saved),
        "vals": [r for r in records if r.get("kind") == "val"],
        "config": cfg,
        "problem": problem,
    }


def cell_state(entry: dict[str, Any], finished: bool, queue: dict[str, str] | None) -> str:
    """done, running, pending, failed or unsubmitted (see the module docstring); 'unknown' where
    squeue could not be asked about a submitted, unfinished cell."""
    if finished:
        return "done"
    tasks = entry.get("tasks", [])
    if not tasks:
        return "unsubmitted"
    if queue is None:
        return "unknown"
    slurm_state = queue.get(tasks[-1]["task"])
    if slurm_state is None:
        return "failed"
    return "running" if slurm_state in ("RUNNING", "COMPLETING", "CONFIGURING") else "pending"


def states(
    sweep_dir: SweepDir, entries: list[dict[str, Any]], totals: dict[str, int | None] | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """{cell name: (state, run_progress)} for the manifest's entries; `totals`: a cell's step budget now
    (a raised train.steps makes a finished cell unfinished: submitted again, it resumes to the new end)."""
    queue = queued_tasks([e["tasks"][-1]["task"] for e in entries if e.get("tasks")])
    out = {}
    for entry in entries:
        progress = run_progress(sweep_dir.run_dir(entry["name"]), (totals or {}).get(entry["name"]))
        out[entry["name"]] = (cell_state(entry, progress["finished"], queue), progress)
    return out


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
