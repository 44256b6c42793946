"""The W&B run of a training run (rank 0, `log.wandb: true`): which run, and one timeline across attempts.

Which run, one rule (`choose_run_id`), applied when the run log starts:

1. resuming from a checkpoint that names a W&B run: that run (`TrainState.wandb_id`, saved in every
   checkpoint), so every later attempt, requeued or resumed by hand, continues it;
2. else `log.wandb_id` from the config: launch/submit.py writes its id into the resolved config it
   submits (so the job's first attempt creates the run the launcher printed), and a user may set it;
3. else a new id.

The id chosen is saved in every checkpoint from then on. Nothing else is read: no environment
variable, no file of the launcher's (runs/NAME/slurm/wandb_id is the launcher's memory of which id
to write into the next submit's config, never read here).

One timeline: everything is logged against an explicit step metric, trainer/step, so every
attempt's rows land on the training step they belong to. A job that resumes from a checkpoint
older than what it logged repeats those steps (bitwise the same, by exact resume): the rows W&B
already has (per kind, "train" and "val", read from the earlier attempts' local W&B files, or the
server's summary online) are not sent again, and the rows up to the checkpoint that W&B lacks (a
killed job's last ones, which can reach metrics.jsonl but not leave wandb-core) are sent from
metrics.jsonl (`backfill`). So each step reaches W&B once. Any W&B failure (no network, wandb-core
killed) turns W&B off with one warning; training and metrics.jsonl go on.

wandb ships no Python reader for its transaction log (runs/NAME/wandb/*run-*-ID/run-ID.wandb);
`transaction_log_records` reads it, for the steps earlier attempts stored.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from salnet.config import Config
from salnet.run.rundir import RunDir
from salnet.run.state import Best

if TYPE_CHECKING:  # torch: this module stays light for the launcher (new_run_id)
    from salnet.validate import SetDetails

log = logging.getLogger("salnet.run.wandb_run")

STEP_METRIC = "trainer/step"
_BLOCK = 32768


def choose_run_id(saved: str | None, cfg: Config) -> str:
    """The W&B run id: the checkpoint's (`saved`), else log.wandb_id, else a new one (module docstring)."""
    return saved or cfg.log.wandb_id or new_run_id()


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


class WandbRun:
    """The W&B run, started at once. Every call goes to W&B only while it works: after a failure
    (`run` is None) the calls do nothing."""

    def __init__(self, cfg: Config, run_id: str, world_size: int, logged_before: dict[str, int], fresh: bool):
        """`logged_before`: per kind of row, the highest step metrics.jsonl holds; `fresh`: nothing
        recorded yet (a new run directory, or train.resume=none cleared it)."""
        self.cfg, self.run_id, self.dir = cfg, run_id, RunDir(cfg.run_dir)
        self.run = None
        self.has: dict[str, int] = {}  # per kind of row ("train", "val"): W&B has every step up to this one
        self._start(world_size, logged_before, fresh)

    def _start(self, world_size: int, logged_before: dict[str, int], fresh: bool) -> None:
        cfg = self.cfg
        # What earlier attempts of this W&B run stored, read before this attempt adds its own file.
        # Their local files, not metrics.jsonl: a killed job's last rows reach metrics.jsonl but
        # may never have left wandb-core.
        try:
            stored = highest_logged_steps(self.dir.wandb, self.run_id)
        except Exception as e:  # a transaction log this reader does not know: better a gap than a double
            log.warning(
                f"cannot read the local W&B files of run {self.run_id} ({type(e).__name__}: {e}); "
                f"taking metrics.jsonl's steps ({logged_before}) as logged to W&B"
            )
            stored = logged_before
        try:
            import wandb  # imported only when asked for: it is slow to import

            timeout = cfg.log.wandb_timeout_s
            self.run = wandb.init(
                project=cfg.log.project,
                entity=cfg.log.entity,
                name=cfg.name,
                id=self.run_id,
                resume="allow",
                dir=str(self.dir),  # W&B keeps its files in wandb/ below it (RunDir.wandb)
                group=cfg.log.group or cfg.name,
                tags=[cfg.name],
                job_type="train",
                config={
                    **cfg.model_dump(mode="json"),
                    "world_size": world_size,
                    "global_batch": cfg.global_batch(world_size),
                },
                settings=wandb.Settings(init_timeout=timeout, finish_timeout=timeout),
            )
            self.run.define_metric(STEP_METRIC)
            self.run.define_metric("*", step_metric=STEP_METRIC)
            # Online, a resumed run's summary comes from the server: the last step it really got.
            on_server = self.run.summary.get(STEP_METRIC)
        except Exception as e:
            self._failed("starting the run", e)
            return
        if fresh:
            self.has = {}
        elif not isinstance(on_server, (int, float)):
            self.has = stored or {}
        elif stored is None:  # no local files (deleted, or another machine's): the server's word for every kind
            self.has = {kind: int(on_server) for kind in ("train", "val")}
        else:  # what was sent but never uploaded is not on the server
            self.has = {kind: min(step, int(on_server)) for kind, step in stored.items()}

    def backfill(self, records: list[dict]) -> None:
        """Give W&B the values of metrics.jsonl (`records`, up to the resumed step) it lacks: the rows a
        killed job wrote there but never got out of wandb-core (say, the validation right before its
        last checkpoint), or those of an attempt whose W&B failed. Numbers only: their pictures are gone."""
        for r in records:
            self.log(r["kind"], r["step"], {k: v for k, v in r.items() if k not in ("kind", "step")})

    def log(self, kind: str, step: int, values: dict) -> None:
        """The numbers among `values`, as KIND/NAME at `step`, unless W&B has that step already."""
        self._log_row(kind, step, _numbers(kind, values))

    def validation(
        self, step: int, scores: dict[str, float], details: dict[str, SetDetails], best: Best, improved: bool
    ) -> None:
        """A validation's scores and pictures, the best so far in the summary, and with log.artifacts
        best.pt when it improved."""
        if self.run is None or step <= self.has.get("val", 0):
            return
        self._call(
            f"building the media of step {step}",
            lambda: self._log_row("val", step, {**_numbers("val", scores), **wandb_media(details, step)}),
        )
        best_path = self.dir.best.resolve()
        self._call(
            "updating the summary",
            lambda: self.run.summary.update(
                {
                    "best/metric": best.metric,
                    "best/value": best.value,
                    "best/step": best.step,
                    "best/checkpoint": str(best_path),
                }
            ),
        )
        if improved and self.cfg.log.artifacts:
            self._call(f"logging {best_path} as an artifact", self._log_best_artifact, best_path, best)

    def finish(self) -> None:
        self._call("finishing the run", lambda: self.run.finish())
        self.run = None

    def _log_row(self, kind: str, step: int, row: dict) -> None:
        if self.run is not None and step > self.has.get(kind, 0):
            self._call(f"logging step {step}", self.run.log, {STEP_METRIC: step, **row})

    def _log_best_artifact(self, path: Path, best: Best) -> None:
        import wandb

        artifact = wandb.Artifact(artifact_name(self.cfg.name), type="model", metadata=asdict(best))
        artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["best", "latest"])

    def _call(self, doing: str, fn: Callable, *args, **kwargs) -> None:
        """Every W&B call goes through here: a failure warns once and turns W&B off."""
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self._failed(doing, e)

    def _failed(self, doing: str, error: Exception) -> None:
        log.warning(
            f"W&B failed while {doing} ({type(error).__name__}: {error}); training goes on without W&B. "
            f"metrics.jsonl keeps every record ({self.dir.metrics}); what W&B stored locally is under "
            f"{self.dir.wandb} (`wandb sync` uploads it)"
        )
        self.run = None
        try:
            import wandb

            wandb.teardown()  # ends the service connection now, not in an atexit hook that would fail again
        except Exception:
            pass


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
    from salnet.validate import PER_IMAGE_METRICS

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
