"""Save and resume: the run directory's checkpoint scheme, RNG capture, best.pt.

    runs/NAME/
      config.yaml               the resolved config
      metrics.jsonl             every logged value
      checkpoints/
        step-00000400/          a complete checkpoint (the strategy's files)
        .step-00000500.tmp/     a save in progress: never picked for resume
      best.pt                   fp32 weights + config + metrics of the best validation

Atomicity: every rank writes into the hidden temporary directory, all ranks meet at a barrier,
then rank 0 fsyncs and renames it into place (a directory rename is atomic), and only then
deletes checkpoints beyond the newest K. A crash at any point leaves the previous complete
checkpoint as the newest `step-*` directory. Everything is loaded with `weights_only=True`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from salnet import __version__, dist
from salnet.fsio import atomic_write, fsync_dir

_COMPLETE = re.compile(r"^step-(\d{8})$")


@dataclass
class ClientState:
    """salnet's part of a checkpoint, saved beside the strategy's model and optimizer state."""

    train: dict         # the training loop's TrainState, as a dict
    world_size: int     # the loader positions and RNG streams below are per rank of this many
    loader: list[dict]  # every rank's TrainStream.state_dict()
    rng: list[dict]     # every rank's rng_state()
    inputs: list[dict] = field(default_factory=list)  # every rank's TrainInput.state_dict() (device-side draws)

    @classmethod
    def gather(cls, train: dict, loader: dict, inputs: dict) -> "ClientState":
        """All ranks call this: the loop state, and from each rank its loader position, input stage and RNG."""
        return cls(train=train, world_size=dist.world_size(), loader=dist.all_gather_object(loader),
                   rng=dist.all_gather_object(rng_state()), inputs=dist.all_gather_object(inputs))


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _COMPLETE.match(p.name))


def resume_path(run_dir: Path, resume: str) -> Optional[Path]:
    """What `train.resume` points at: 'auto' -> newest complete checkpoint (or None), 'none' -> None."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir() or not _COMPLETE.match(path.name):
        raise FileNotFoundError(
            f"train.resume={resume!r} is not a complete checkpoint directory (expected .../checkpoints/step-NNNNNNNN); "
            f"valid values: 'auto', 'none' or such a path")
    return path


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def save_checkpoint(run_dir: Path, step: int, strategy, client: ClientState, keep: int) -> Path:
    """All ranks call this; returns the complete checkpoint directory."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    strategy.save(tmp, asdict(client))
    dist.barrier()  # every rank has finished writing
    if dist.is_main():
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def save_best(run_dir: Path, weights: dict, config: dict, metrics: dict, step: int) -> Path:
    """best.pt: float32 weights of the plain network, in one format whatever the strategy."""
    path = Path(run_dir) / "best.pt"
    with atomic_write(path, "wb") as f:
        torch.save({"model": weights, "config": config, "metrics": metrics, "step": step,
                    "salnet_version": __version__}, f)
    return path


def load_checkpoint(directory: Path, strategy) -> ClientState:
    """Restore `strategy` from a checkpoint directory; returns salnet's part of it."""
    return ClientState(**strategy.load(directory))


def load_best(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# RNG: every rank's generators, so a resumed run draws exactly what the uninterrupted one would.
# --------------------------------------------------------------------------------------------


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store it as a tensor.
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
