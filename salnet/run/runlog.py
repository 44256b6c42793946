"""What a run tells the world: console lines, metrics.jsonl, W&B (optional) and runs/NAME/plots/. Rank 0 only.

metrics.jsonl is always written, whether or not W&B is on: it is the record a run can be
audited from (salnet.run.rundir.MetricsFile: each step once, a torn tail cut on resume). W&B and the
plots show the same things: losses, lr, every validation metric, and per val set at each
validation the PR and F-threshold curves, a fixed panel of predictions and the worst images.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

from salnet import dist
from salnet.config import Config
from salnet.run.rundir import MetricsFile, read_records
from salnet.slurm import WANDB_ID_ENV
from salnet.validate import PER_IMAGE_METRICS, SetDetails

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
    """Rank 0's record of the run: console, metrics.jsonl (always, every value), W&B (log.wandb),
    runs/NAME/plots/ (log.plots). Other ranks construct it too and do nothing.

    W&B logs against an explicit step metric, trainer/step, so every attempt's rows land on the
    training step they belong to, in one run (the id comes from the checkpoint, log.wandb_id or
    SALNET_WANDB_ID). A job that resumes from a checkpoint older than what it logged repeats those
    steps (bitwise the same, by exact resume): the rows W&B already has (per kind, "train" and
    "val", read from the earlier attempts' local W&B files, or the server's summary online) go to
    metrics.jsonl only, and the rows up to the checkpoint that W&B lacks (a killed job's last ones,
    which can reach metrics.jsonl but not leave wandb-core) are sent again from metrics.jsonl. So
    each step reaches W&B once. Any W&B failure (no network, wandb-core killed) turns W&B off
    with one warning; training and metrics.jsonl go on.
    """

    def __init__(self, cfg: Config, resumed_step: int, wandb_id: str | None, world_size: int = 1):
        self.cfg = cfg
        self.enabled = dist.is_main()
        self.metrics_file = MetricsFile(cfg.run_dir)
        self.plots_dir = cfg.run_dir / "plots"
        self.wandb = None
        self.wandb_id = wandb_id
        self.wandb_has: dict[str, int] = {}  # per kind of row ("train", "val"): W&B has every step up to this one
        self.bar: tqdm | None = None
        self._plotter: threading.Thread | None = None
        if not self.enabled:
            return
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        logged_before: dict[str, int] = {}
        for r in read_records(self.metrics_file.path):
            logged_before[r["kind"]] = max(logged_before.get(r["kind"], 0), r["step"])
        # Nothing recorded: a new run directory, or train.resume=none cleared it; pictures (and W&B
        # rows, with a preset id) of an earlier run here are not this run's.
        self.fresh = not logged_before
        for pattern in (".*.tmp", *(("*.png", "*.npz") if self.fresh else ())):  # .tmp: what a killed job was writing
            for old in self.plots_dir.glob(pattern):
                old.unlink(missing_ok=True)
        self.metrics_file.resume_at(resumed_step)
        if cfg.log.wandb:
            # The run id lives in the checkpoint (or a launcher presets it in log.wandb_id or the
            # environment), so a requeued job continues the same W&B run.
            self.wandb_id = wandb_id or cfg.log.wandb_id or os.environ.get(WANDB_ID_ENV) or uuid.uuid4().hex[:8]
            self._start_wandb(world_size, logged_before)
            self._backfill_wandb()

    # ---- W&B ----------------------------------------------------------------------------------

    def _start_wandb(self, world_size: int, logged_before: dict[str, int]) -> None:
        cfg = self.cfg
        # What earlier attempts of this W&B run stored, read before this attempt adds its own file.
        # Their local files, not metrics.jsonl: a killed job's last rows reach metrics.jsonl but
        # may never have left wandb-core.
        try:
            stored = highest_logged_steps(cfg.run_dir / "wandb", self.wandb_id)
        except Exception as e:  # a transaction log this reader does not know: better a gap than a double
            log.warning(
                f"cannot read the local W&B files of run {self.wandb_id} ({type(e).__name__}: {e}); "
                f"taking metrics.jsonl's steps ({logged_before}) as logged to W&B"
            )
            stored = logged_before
        try:
            import wandb  # imported only when asked for: it is slow to import

            timeout = cfg.log.wandb_timeout_s
            self.wandb = wandb.init(
                project=cfg.log.project,
                entity=cfg.log.entity,
                name=cfg.name,
                id=self.wandb_id,
                resume="allow",
                dir=str(cfg.run_dir),
                group=cfg.name,
                tags=[cfg.name],
                job_type="train",
                config={
                    **cfg.model_dump(mode="json"),
                    "world_size": world_size,
                    "global_batch": cfg.global_batch(world_size),
                },
                settings=wandb.Settings(init_timeout=timeout, finish_timeout=timeout),
            )
            self.wandb.define_metric(STEP_METRIC)
            self.wandb.define_metric("*", step_metric=STEP_METRIC)
            # Online, a resumed run's summary comes from the server: the last step it really got.
            on_server = self.wandb.summary.get(STEP_METRIC)
        except Exception as e:
            self._wandb_failed("starting the run", e)
            return
        if self.fresh:
            self.wandb_has = {}
        elif not isinstance(on_server, (int, float)):
            self.wandb_has = stored or {}
        elif stored is None:  # no local files (deleted, or another machine's): the server's word for every kind
            self.wandb_has = {kind: int(on_server) for kind in ("train", "val")}
        else:  # what was sent but never uploaded is not on the server
            self.wandb_has = {kind: min(step, int(on_server)) for kind, step in stored.items()}

    def _backfill_wandb(self) -> None:
        """Give W&B the values of metrics.jsonl it lacks up to the resumed step: the rows a killed job
        wrote there but never got out of wandb-core (say, the validation right before its last
        checkpoint), or those of an attempt whose W&B failed. Numbers only: their pictures are gone."""
        for r in read_records(self.metrics_file.path):
            if self.wandb is None:
                return
            self._wandb_log(
                r["kind"], r["step"], _numbers(r["kind"], {k: v for k, v in r.items() if k not in ("kind", "step")})
            )

    def _wandb_failed(self, doing: str, error: Exception) -> None:
        log.warning(
            f"W&B failed while {doing} ({type(error).__name__}: {error}); training goes on without W&B. "
            f"metrics.jsonl keeps every record ({self.metrics_file.path}); what W&B stored locally is under "
            f"{self.cfg.run_dir / 'wandb'} (`wandb sync` uploads it)"
        )
        self.wandb = None
        try:
            import wandb

            wandb.teardown()  # ends the service connection now, not in an atexit hook that would fail again
        except Exception:
            pass

    def _wandb(self, doing: str, fn: Callable, *args, **kwargs) -> None:
        """Every W&B call goes through here: a failure warns once and turns W&B off."""
        if self.wandb is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self._wandb_failed(doing, e)

    def _wandb_log(self, kind: str, step: int, values: dict) -> None:
        if self.wandb is not None and step > self.wandb_has.get(kind, 0):
            self._wandb(f"logging step {step}", self.wandb.log, {STEP_METRIC: step, **values})

    # ---- what the loop calls ------------------------------------------------------------------

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        # W&B first: a job killed in between leaves W&B with a step metrics.jsonl lacks (the next
        # attempt logs it again), never the other way round (a step W&B would never get).
        self._wandb_log(kind, step, _numbers(kind, values))
        self.metrics_file.append({"kind": kind, "step": step, **values})

    def validation(
        self, step: int, scores: dict[str, float], details: dict[str, SetDetails], best: dict, improved: bool
    ) -> None:
        """A validation's scores (metrics.jsonl, W&B), pictures (W&B, plots/), the best so far (W&B
        summary) and, with log.artifacts, best.pt when it improved. All ranks call it (only rank 0 acts)."""
        if not self.enabled:
            return
        if self.wandb is not None and step > self.wandb_has.get("val", 0):
            self._wandb(
                f"building the media of step {step}",
                lambda: self._wandb_log("val", step, {**_numbers("val", scores), **wandb_media(details, step)}),
            )
            best_path = (self.cfg.run_dir / "best.pt").resolve()
            self._wandb(
                "updating the summary",
                lambda: self.wandb.summary.update(
                    {
                        "best/metric": best["metric"],
                        "best/value": best["value"],
                        "best/step": best["step"],
                        "best/checkpoint": str(best_path),
                    }
                ),
            )
            if improved and self.cfg.log.artifacts:
                self._wandb(f"logging {best_path} as an artifact", self._log_best_artifact, best_path, best)
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

    def _log_best_artifact(self, path: Path, best: dict) -> None:
        import wandb

        artifact = wandb.Artifact(artifact_name(self.cfg.name), type="model", metadata=dict(best))
        artifact.add_file(str(path), name=path.name)
        self.wandb.log_artifact(artifact, aliases=["best", "latest"])

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
        self._wandb("finishing the run", lambda: self.wandb.finish())
        self.wandb = None


STEP_METRIC = "trainer/step"
_BLOCK = 32768


def transaction_log_records(path: Path) -> Iterator:
    """The protobuf Records (wandb.proto.wandb_internal_pb2.Record) of a W&B transaction log,
    runs/NAME/wandb/*run-*-ID/run-ID.wandb. wandb ships no Python reader for it (wandb-core reads
    it), so this follows its framing: a 7-byte W&B header, then LevelDB log records (crc32c,
    length, type: FULL=1, FIRST=2, MIDDLE=3, LAST=4) that never cross a 32 KiB block. A record that
    a killed writer left unfinished ends the file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # zero padding, or a half-written record
            return
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def highest_logged_steps(wandb_dir: Path, run_id: str) -> dict[str, int] | None:
    """Per kind of row (the first part of its keys: "train", "val"), the highest trainer/step in the
    local transaction logs of W&B run `run_id`; None when there are none."""
    paths = list(Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb"))
    if not paths:
        return None
    highest: dict[str, int] = {}
    for path in paths:
        for record in transaction_log_records(path):
            if record.HasField("history"):
                row = {(item.key or "/".join(item.nested_key)): item.value_json for item in record.history.item}
                if STEP_METRIC in row:
                    step = int(json.loads(row[STEP_METRIC]))
                    for kind in {key.split("/")[0] for key in row if key != STEP_METRIC and not key.startswith("_")}:
                        highest[kind] = max(highest.get(kind, 0), step)
    return highest


def _numbers(kind: str, values: dict) -> dict:
    return {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}


def artifact_name(run_name: str) -> str:
    """W&B artifact names take letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", run_name) + "-best"


def wandb_media(details: dict[str, SetDetails], step: int) -> dict:
    """Per val set: the fixed panel (one image | ground truth | prediction picture per sample,
    captioned with its key), the worst-K table (key, per-image metrics, the three pictures),
    and the PR and F-measure-vs-threshold curves (one table, two line charts)."""
    import wandb

    from salnet.run.plots import panel_grid

    media = {}
    for name, d in details.items():
        prefix = f"val/{name}"
        if d.panel:
            media[f"{prefix}/panel"] = [wandb.Image(panel_grid([s]), caption=s.key) for s in d.panel]
        if d.worst:
            media[f"{prefix}/worst"] = wandb.Table(
                columns=["key", *PER_IMAGE_METRICS, "image", "ground truth", "prediction"],
                data=[
                    [
                        s.key,
                        *(s.metrics[m] for m in PER_IMAGE_METRICS),
                        wandb.Image(s.image),
                        wandb.Image(s.gt),
                        wandb.Image(s.pred),
                    ]
                    for s in d.worst
                ],
            )
        if "F" in d.curves:
            table = wandb.Table(columns=list(d.curves), data=[list(row) for row in zip(*d.curves.values())])
            media[f"{prefix}/pr"] = wandb.plot.line(
                table, "recall", "precision", title=f"{name}: PR curve @ step {step}"
            )
            media[f"{prefix}/f_threshold"] = wandb.plot.line(
                table, "threshold", "F", title=f"{name}: F-measure vs threshold @ step {step}"
            )
    return media


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
