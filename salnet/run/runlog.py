"""What a run tells the world: console lines, metrics.jsonl, W&B (optional) and runs/NAME/plots/. Rank 0 only.

`RunLog` fans each record out to them; the W&B run is salnet.run.wandb_run's, the plots salnet.run.plots'.

metrics.jsonl is always written, whether or not W&B is on: it is the record a run can be
audited from (salnet.run.rundir.MetricsFile: each step once, a torn tail cut on resume). W&B and the
plots show the same things: losses, lr, every validation metric, and per val set at each
validation the PR and F-threshold curves, a fixed panel of predictions and the worst images.
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from tqdm import tqdm

from salnet import dist
from salnet.config import Config
from salnet.run.rundir import MetricsFile, RunDir, read_records
from salnet.run.state import Best
from salnet.run.wandb_run import WandbRun, choose_run_id
from salnet.validate import SetDetails

T = TypeVar("T")
log = logging.getLogger("salnet.run.runlog")


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
    device, no host sync per step), global images/s and the share of time spent waiting for data;
    and over this attempt: the time elapsed and the time left (at this attempt's mean pace, which
    includes validation and saving). `bar`, if given, advances once per step."""

    def __init__(
        self,
        clock: DataClock,
        images_per_step: int,
        total_steps: int | None = None,
        start_step: int = 0,
        bar: tqdm | None = None,
    ):
        self.clock, self.images_per_step, self.bar = clock, images_per_step, bar
        self.total_steps, self.start_step, self.step = total_steps, start_step, start_step
        self.attempt_start = time.perf_counter()
        self._open()

    def _open(self) -> None:
        self.start, self.waited_before, self.steps, self.losses = time.perf_counter(), self.clock.waiting, 0, {}

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """One optimizer step's loss components."""
        self.steps += 1
        self.step += 1
        for name, value in losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + value
        if self.bar is not None:
            self.bar.update()

    def close(self) -> dict:
        """The window's values (losses averaged over steps and ranks; all ranks call this); starts the next window."""
        now = time.perf_counter()
        elapsed = now - self.start
        losses = dict(
            zip(self.losses, dist.all_reduce_values([float(v) / self.steps for v in self.losses.values()], "avg"))
        )
        values = {
            "losses": losses,
            "images_per_s": self.steps * self.images_per_step / elapsed,
            "data_wait": (self.clock.waiting - self.waited_before) / elapsed,
            "peak_mem_mib": peak_memory_mib(),
            "elapsed_s": now - self.attempt_start,
        }
        if self.total_steps is not None:
            values["eta_s"] = (self.total_steps - self.step) * values["elapsed_s"] / max(1, self.step - self.start_step)
        if self.bar is not None and "loss" in losses:
            self.bar.set_postfix(loss=f"{losses['loss']:.4f}", refresh=False)
        self._open()
        return values


class RunLog:
    """Rank 0's record of the run, fanned out to the console, metrics.jsonl (always, every value),
    W&B (log.wandb; salnet.run.wandb_run) and runs/NAME/plots/ (log.plots). Other ranks construct
    it too and do nothing.

    `wandb_id`: the W&B run id the resumed checkpoint names (None for a new run); `self.wandb_id`
    is the one chosen (salnet.run.wandb_run.choose_run_id), for the loop to save in its checkpoints.
    """

    def __init__(self, cfg: Config, resumed_step: int, wandb_id: str | None, world_size: int = 1):
        self.cfg = cfg
        self.enabled = dist.is_main()
        run = RunDir(cfg.run_dir)
        self.metrics_file = MetricsFile(run)
        self.plots_dir = run.plots
        self.wandb: WandbRun | None = None
        self.wandb_id = wandb_id
        self.bar: tqdm | None = None
        self._plotter: threading.Thread | None = None
        if not self.enabled:
            return
        run.root.mkdir(parents=True, exist_ok=True)
        logged_before: dict[str, int] = {}
        for r in read_records(self.metrics_file.path):
            logged_before[r["kind"]] = max(logged_before.get(r["kind"], 0), r["step"])
        # Nothing recorded: a new run directory, or train.resume=none cleared it; pictures (and W&B
        # rows, with a preset id) of an earlier run here are not this run's.
        fresh = not logged_before
        for pattern in (".*.tmp", *(("*.png", "*.npz") if fresh else ())):  # .tmp: what a killed job was writing
            for old in self.plots_dir.glob(pattern):
                old.unlink(missing_ok=True)
        self.metrics_file.resume_at(resumed_step)
        if cfg.log.wandb:
            self.wandb_id = choose_run_id(wandb_id, cfg)
            self.wandb = WandbRun(cfg, self.wandb_id, world_size, logged_before, fresh)
            self.wandb.backfill(read_records(self.metrics_file.path))

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        # W&B first: a job killed in between leaves W&B with a step metrics.jsonl lacks (the next
        # attempt logs it again), never the other way round (a step W&B would never get).
        if self.wandb is not None:
            self.wandb.log(kind, step, values)
        self.metrics_file.append({"kind": kind, "step": step, **values})

    def validation(
        self, step: int, scores: dict[str, float], details: dict[str, SetDetails], best: Best, improved: bool
    ) -> None:
        """A validation's scores (metrics.jsonl, W&B), pictures (W&B, plots/), the best so far (W&B
        summary) and, with log.artifacts, best.pt when it improved. All ranks call it (only rank 0 acts)."""
        if not self.enabled:
            return
        if self.wandb is not None:
            self.wandb.validation(step, scores, details, best, improved)
        self.metrics_file.append({"kind": "val", "step": step, **scores})  # after W&B, as in record()
        if self.cfg.log.plots:
            self.write_plots(step, details)

    def write_plots(self, step: int, details: dict[str, SetDetails]) -> None:
        """Draw runs/NAME/plots/ in a thread: matplotlib takes seconds, which training (and the
        ranks waiting for rank 0) need not wait for. One drawing at a time; close() waits for the last."""
        self.wait_for_plots()
        records = read_records(self.metrics_file.path)
        self._plotter = threading.Thread(
            target=self._draw, args=(step, details, records), name="salnet-plots", daemon=True
        )
        self._plotter.start()

    def wait_for_plots(self) -> None:
        if self._plotter is not None:
            self._plotter.join()
            self._plotter = None

    def _draw(self, step: int, details: dict[str, SetDetails], records: list[dict]) -> None:
        try:
            from salnet.run import plots  # matplotlib: imported at the first validation, not at start-up

            plots.save_latest(self.plots_dir / plots.LATEST, step, details)
            plots.render(self.plots_dir, records, (step, details))
        except Exception as e:  # a full disk, say: the pictures are worth a warning, not the run
            log.warning(f"could not write {self.plots_dir} at step {step} ({type(e).__name__}: {e})")

    def progress(self, total: int, initial: int) -> tqdm | None:
        """A bar over the training steps where a person watches (rank 0, stdout a terminal); None
        in job logs, which get the plain train lines."""
        if self.enabled and sys.stdout.isatty():
            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", file=sys.stdout, dynamic_ncols=True
            )
        return self.bar

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)  # above the bar, which then redraws
        else:
            print(text, flush=True)

    def close(self) -> None:
        self.wait_for_plots()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_train_line(step: int, total: int, values: dict) -> str:
    parts = " ".join(f"{k}={v:.4f}" for k, v in values["losses"].items())
    timing = "".join(
        f" {name}={format_duration(values[key])}"
        for name, key in (("elapsed", "elapsed_s"), ("eta", "eta_s"))
        if key in values
    )
    return (
        f"step {step}/{total} epoch {values['epoch']} {parts} lr={values['lr']:.3g} "
        f"img/s={values['images_per_s']:.1f} data_wait={values['data_wait']:.0%} "
        f"mem={values['peak_mem_mib']:.0f}MiB{timing}"
        + (f" skipped={values['skipped_steps']}" if values["skipped_steps"] else "")
    )


def format_metrics_table(step: int, scores: dict[str, float], best: Best) -> str:
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
    lines.append(f"  best {best.metric}={best.value:.4f} @ step {best.step}")
    return "\n".join(lines)
