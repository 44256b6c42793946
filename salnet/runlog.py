"""What a run tells the world: console lines, metrics.jsonl, and (optionally) W&B. Rank 0 only.

metrics.jsonl is always written, whether or not W&B is on: it is the record a run can be
audited from (salnet.rundir.MetricsFile: each step once, a torn tail cut on resume).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
import uuid
from typing import Iterable, Iterator, Optional, TypeVar

import torch

from salnet import dist
from salnet.config import Config
from salnet.rundir import MetricsFile


T = TypeVar("T")


def setup_logging() -> None:
    """Show salnet's log records (e.g. "loaded torchvision weights"): INFO and up on rank 0,
    warnings and errors on the other ranks, each line naming its rank in a multi-rank job."""
    rank, world = dist.rank(), dist.world_size()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(("" if world == 1 else f"[rank {rank}] ") + "%(name)s: %(message)s"))
    logger = logging.getLogger("salnet")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def peak_memory_mib() -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if dist.device().type == "cuda":
        return torch.cuda.max_memory_allocated(dist.device()) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class DataClock:
    """Measures how much of the wall time the loop spends waiting for the next batch."""

    def __init__(self):
        self.waiting = 0.0

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waiting += time.perf_counter() - start
            yield batch


class LogWindow:
    """What the train line reports over the steps since the last one: mean losses (summed on the
    device, no host sync per step), global images/s and the share of time spent waiting for data."""

    def __init__(self, clock: DataClock, images_per_step: int):
        self.clock, self.images_per_step = clock, images_per_step
        self._open()

    def _open(self) -> None:
        self.start, self.waited_before, self.steps, self.losses = time.perf_counter(), self.clock.waiting, 0, {}

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """One optimizer step's loss components."""
        self.steps += 1
        for name, value in losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + value

    def close(self) -> dict:
        """The window's values (losses averaged over steps and ranks; all ranks call this); starts the next window."""
        elapsed = time.perf_counter() - self.start
        losses = dict(zip(self.losses, dist.all_reduce_values([float(v) / self.steps for v in self.losses.values()], "avg")))
        values = {"losses": losses, "images_per_s": self.steps * self.images_per_step / elapsed,
                  "data_wait": (self.clock.waiting - self.waited_before) / elapsed, "peak_mem_mib": peak_memory_mib()}
        self._open()
        return values


class RunLog:
    def __init__(self, cfg: Config, resumed_step: int, wandb_id: Optional[str]):
        self.enabled = dist.is_main()
        self.metrics_file = MetricsFile(cfg.run_dir)
        self.wandb = None
        self.wandb_id = wandb_id
        if not self.enabled:
            return
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file.resume_at(resumed_step)
        if cfg.log.wandb:
            import wandb  # imported only when asked for: it is slow to import

            # The run id lives in the checkpoint (or the launcher presets it in log.wandb_id), so a
            # requeued job continues the same W&B run.
            self.wandb_id = wandb_id or cfg.log.wandb_id or uuid.uuid4().hex[:8]
            self.wandb = wandb.init(project=cfg.log.project, entity=cfg.log.entity, name=cfg.name, id=self.wandb_id,
                                    resume="allow", dir=str(cfg.run_dir), config=cfg.model_dump(mode="json"))

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.metrics_file.append({"kind": kind, "step": step, **values})
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def format_train_line(step: int, total: int, values: dict) -> str:
    parts = " ".join(f"{k}={v:.4f}" for k, v in values["losses"].items())
    return (f"step {step}/{total} epoch {values['epoch']} {parts} lr={values['lr']:.3g} "
            f"img/s={values['images_per_s']:.1f} data_wait={values['data_wait']:.0%} "
            f"mem={values['peak_mem_mib']:.0f}MiB" + (f" skipped={values['skipped_steps']}" if values["skipped_steps"] else ""))


def format_metrics_table(step: int, scores: dict[str, float], best: dict) -> str:
    """One row per val set (and the mean over sets), one column per metric."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in scores.items():
        set_name, _, metric = key.rpartition("/")
        if metric != "images":
            rows.setdefault(set_name, {})[metric] = value
    names = list(next(iter(rows.values())))
    width = max(8, *(len(n) for n in rows))
    lines = [f"validation @ step {step}", f"  {'set':<{width}} " + " ".join(f"{n:>8}" for n in names)]
    for set_name, values in rows.items():
        lines.append(f"  {set_name:<{width}} " + " ".join(f"{values[n]:>8.4f}" for n in names))
    lines.append(f"  best {best['metric']}={best['value']:.4f} @ step {best['step']}")
    return "\n".join(lines)
