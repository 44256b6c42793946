"""Save and resume: the run's checkpoints (`checkpoints/step-N/`, laid out by salnet.run.rundir.RunDir),
what they hold besides the strategy's state (`ClientState`), RNG capture, best.pt.

Atomicity: every rank writes into the hidden temporary directory, all ranks meet at a barrier,
then rank 0 fsyncs and renames it into place (a directory rename is atomic), and only then
deletes checkpoints beyond the newest K. A crash at any point leaves the previous complete
checkpoint as the newest `step-*` directory. Everything is loaded with `weights_only=True`.

Verification: each checkpoint lists the size and hash of its files (salnet.run.checksums). Resume
verifies before loading; `auto` sets a bad checkpoint aside and tries the next newest, an explicit
path that is bad is an error. A save that fails (disk full, I/O error) removes its temporary
directory on every rank, keeps the earlier checkpoints and stops with the space it needed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from salnet import __version__, dist
from salnet.fsio import atomic_write, fsync_dir
from salnet.run.checksums import CheckpointCorrupt, file_digest, load_file, tensor_digest, verify, write_manifest
from salnet.run.rundir import RunDir, free_bytes, tree_bytes
from salnet.run.state import TrainState

CONFIG = "config.json"  # the run's resolved config, inside each checkpoint


@dataclass
class ClientState:
    """salnet's part of a checkpoint, saved beside the strategy's model and optimizer state."""

    train: TrainState
    world_size: int  # the loader positions and RNG streams below are per rank of this many
    loader: list[dict]  # every rank's TrainStream.state_dict()
    rng: list[dict]  # every rank's rng_state()
    inputs: list[dict] = field(default_factory=list)  # every rank's TrainInput.state_dict() (device-side draws)

    @classmethod
    def gather(cls, train: TrainState, loader: dict, inputs: dict) -> ClientState:
        """All ranks call this: the loop state, and from each rank its loader position, input stage and RNG."""
        return cls(
            train=train,
            world_size=dist.world_size(),
            loader=dist.all_gather_object(loader),
            rng=dist.all_gather_object(rng_state()),
            inputs=dist.all_gather_object(inputs),
        )

    def to_dict(self) -> dict[str, Any]:
        """What the strategy saves."""
        return {**asdict(self), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ClientState:
        return cls(**{**saved, "train": TrainState.from_dict(saved["train"])})


def resume_path(run_dir: os.PathLike | str, resume: str) -> Path | None:
    """What `train.resume` points at: 'auto' -> newest complete checkpoint (or None), 'none' -> None,
    a path -> that checkpoint directory (an error if it is not one). Nothing is verified here."""
    if resume == "none":
        return None
    if resume == "auto":
        found = RunDir(run_dir).complete_checkpoints()
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir() or RunDir.checkpoint_step(path) is None:
        raise FileNotFoundError(
            f"train.resume={resume!r} is not a complete checkpoint directory (expected .../checkpoints/step-NNNNNNNN); "
            f"valid values: 'auto', 'none' or such a path"
        )
    return path


def choose_checkpoint(run_dir: os.PathLike | str, resume: str) -> Path | None:
    """The verified checkpoint to resume from (all ranks call this; rank 0 decides, everyone gets its answer).

    auto: the newest good one; each bad one is reported and moved to corrupt-step-N/. A path: that
    one, or an error naming the bad file; this run's checkpoints newer than it are moved to
    abandoned-step-N/ so that a later `auto` continues the branch chosen here. A checkpoint of
    another run is copied into this one (and this run's own checkpoint of that step, if any, set
    aside): the other run is never modified.
    """
    choice, error = None, ""
    if dist.is_main():
        choice, error = _attempt(lambda: _choose(RunDir(run_dir), resume))
    choice, error = dist.all_gather_object((choice, error))[0]
    if error:
        raise CheckpointCorrupt(error.split(": ", 1)[1] if error.startswith("CheckpointCorrupt") else error)
    return choice


def _choose(run: RunDir, resume: str) -> Path | None:
    chosen = resume_path(run, resume)
    if chosen is None:
        return None
    if resume != "auto":
        verify(chosen)
        own = run.checkpoint(RunDir.checkpoint_step(chosen))
        foreign = chosen.resolve() != own.resolve()
        for newer in [c for c in run.complete_checkpoints() if c.name > own.name or (foreign and c == own)]:
            aside = RunDir.set_aside(newer, "abandoned")
            print(f"train.resume={resume}: moved {newer} to {aside.name} (kept, not deleted)", flush=True)
        if foreign:
            _copy_checkpoint(chosen, run)
            print(f"train.resume={resume}: copied into {own} (that run is not modified)", flush=True)
        return own
    tried = []
    for candidate in reversed(run.complete_checkpoints()):
        try:
            verify(candidate)
            return candidate
        except CheckpointCorrupt as e:
            aside = RunDir.set_aside(candidate, "corrupt")
            tried.append(f"{e} (moved to {aside.name})")
            print(f"resume: {e}; moved {candidate.name} aside to {aside.name} and trying the next newest", flush=True)
    raise CheckpointCorrupt(
        f"no intact checkpoint under {run.checkpoints}: "
        + "; ".join(tried)
        + "; start over with train.resume=none, or point train.resume at a copy you trust"
    )


def _copy_checkpoint(source: Path, run: RunDir) -> None:
    """Another run's verified checkpoint into this run, completed as a save is (temporary directory,
    fsync, rename), then verified as copied: what resume loads is this run's own file."""
    step = RunDir.checkpoint_step(source)
    tmp, final = run.partial(step), run.checkpoint(step)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    _fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    verify(final)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


class CheckpointSaveError(RuntimeError):
    """A save that did not complete; the earlier checkpoints are intact."""


def _attempt(action) -> tuple[object, str]:
    """(result, '') or (None, what went wrong): a rank's failure is reported to all before anyone raises."""
    try:
        return action(), ""
    except Exception as e:  # noqa: BLE001  (any failure of a save is reported the same way, with its cause)
        return None, f"{type(e).__name__}: {e}"


def save_checkpoint(
    run_dir: os.PathLike | str, step: int, strategy, client: ClientState, keep: int, config: dict | None = None
) -> Path:
    """All ranks call this; returns the complete checkpoint directory. `config` (the run's resolved
    config) is kept beside the state as config.json, so a resume can compare before loading anything."""
    run = RunDir(run_dir)
    root, final, tmp = run.checkpoints, run.checkpoint(step), run.partial(step)
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    digests, error = _attempt(lambda: strategy.save(tmp, client.to_dict()))
    gathered = dist.all_gather_object((digests, error))  # also the barrier: every rank has finished writing
    errors = [f"rank {rank}: {e}" for rank, (_, e) in enumerate(gathered) if e]
    if not errors and dist.is_main():
        _, error = _attempt(
            lambda: _complete(tmp, final, {n: d for files, _ in gathered for n, d in files.items()}, config)
        )
        errors = [f"rank 0: {error}"] if error else []
    errors = dist.all_gather_object(errors)[0]  # rank 0's verdict, for everyone
    if errors:
        if dist.is_main():
            complete = run.complete_checkpoints()
            needed = tree_bytes(complete[-1] if complete else tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise CheckpointSaveError(
            f"saving the checkpoint of step {step} into {root} failed ({'; '.join(errors)}); its temporary directory was removed "
            f"and the earlier checkpoints are kept"
            + (
                f". A checkpoint takes about {needed} bytes; {free_bytes(root)} bytes are free "
                f"there: free space or lower checkpoint.keep"
                if dist.is_main()
                else ""
            )
        )
    if dist.is_main():
        for old in run.complete_checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _complete(tmp: Path, final: Path, digests: dict, config: dict | None) -> None:
    """Rank 0: the config, the checksums, fsync, then the atomic rename that makes the checkpoint complete."""
    if config is not None:
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        digests = {**digests, CONFIG: file_digest(tmp / CONFIG)}
    write_manifest(tmp, digests)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


BEST_DIGEST = "xxh3_128"  # best.pt's key for the digest of everything else in it (_best_digest)
LEGACY_WEIGHTS_DIGEST = "weights_xxh3_128"  # what salnet before issue 22 wrote: its tensors only


def save_best(run_dir: os.PathLike | str, weights: dict, config: dict, metrics: dict, step: int | None) -> Path:
    """best.pt: float32 weights of the plain network, in one format whatever the strategy, with
    a digest of its tensors, config and metrics that load_best checks."""
    best = {"model": weights, "config": config, "metrics": metrics, "step": step, "salnet_version": __version__}
    path = RunDir(run_dir).best
    with atomic_write(path, "wb") as f:
        torch.save({**best, BEST_DIGEST: _best_digest(best)}, f)
    return path


def _best_digest(best: dict) -> str:
    """XXH3-128 over best.pt's tensors and every other value in it: predict and evaluate act on its
    config (e.g. data.eval_size) as much as on its weights, so a change to either must show."""
    others = {k: v for k, v in best.items() if k not in ("model", BEST_DIGEST)}
    h = xxhash.xxh3_128(tensor_digest(best["model"]).encode())
    h.update(json.dumps(others, sort_keys=True).encode())
    return h.hexdigest()


def checkpoint_config(directory: Path) -> dict | None:
    """The resolved config a checkpoint was saved with (None for one saved without it)."""
    path = Path(directory) / CONFIG
    return json.loads(path.read_text()) if path.exists() else None


def load_checkpoint(directory: Path, strategy) -> ClientState:
    """Restore `strategy` from a checkpoint directory; returns salnet's part of it."""
    return ClientState.from_dict(strategy.load(directory))


def load_best(path: Path) -> dict:
    """best.pt (or an exported one), checked against its digest; errors name the file. A best.pt of
    an earlier salnet carries a digest of its weights only (LEGACY_WEIGHTS_DIGEST), checked as such."""
    best = load_file(Path(path), map_location="cpu")
    if not isinstance(best, dict):  # a bare tensor or list: the caller says what a best.pt is
        return best
    if BEST_DIGEST in best and _best_digest(best) != best[BEST_DIGEST]:
        raise CheckpointCorrupt(
            f"{path}: its weights, config or metrics do not match their checksum (the file changed after it was written)"
        )
    if LEGACY_WEIGHTS_DIGEST in best and tensor_digest(best["model"]) != best[LEGACY_WEIGHTS_DIGEST]:
        raise CheckpointCorrupt(
            f"{path}: its weights do not match their checksum (the file changed after it was written)"
        )
    return best


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
