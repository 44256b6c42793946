"""Run by test_backbone_families.py as two ranks: salnet.train's loop for several runs in one job.

usage: family_probe.py CONFIG[:resume] ...

Each CONFIG (a YAML file) runs as `python -m salnet.train --config CONFIG` runs it (salnet.trainer.train
in the job's process group), one after the other: the job pays for torch's and DeepSpeed's start-up
once, for every backbone family and strategy. With `:resume`, rank 0 then renames the run
directory to RUN_DIR-uninterrupted and gives RUN_DIR back without its last checkpoint (hard links:
no copying; the uninterrupted run's lock stays behind, held until the job ends), and the run
starts again: it resumes from the checkpoint before, as after a kill, and writes the last
checkpoint anew (the RNG streams come from the checkpoint, not from this process's state).
"""

import os
import shutil
import sys
from pathlib import Path

from salnet import dist
from salnet.config import load_config
from salnet.run.rundir import RunDir
from salnet.run.runlog import setup_logging
from salnet.trainer import train


def link_or_copy(src: str, dst: str) -> None:
    """Checkpoints and best.pt are written once (under a temporary name, then renamed): hard links.
    metrics.jsonl is cut back and appended to in place: a copy."""
    (os.link if "checkpoints" in Path(src).parts or Path(src).name == "best.pt" else shutil.copy2)(src, dst)


def restart_without_last_checkpoint(run_dir: Path) -> None:
    aside = run_dir.rename(run_dir.with_name(f"{run_dir.name}-uninterrupted"))
    left_out = {RunDir(aside).complete_checkpoints()[-1].name, RunDir(aside).lock.name}
    shutil.copytree(aside, run_dir, ignore=lambda _, names: left_out & set(names), copy_function=link_or_copy)


def main():
    with dist.distributed():
        setup_logging()
        for case in sys.argv[1:]:
            path, _, then = case.partition(":")
            cfg = load_config(path)
            train(cfg)
            if then == "resume":
                if dist.is_main():
                    restart_without_last_checkpoint(cfg.run_dir)
                dist.barrier()
                train(cfg)


if __name__ == "__main__":
    main()
