"""What the training loop carries across a checkpoint: `TrainState`, and in it the `Best` validation.

Typed in the loop, plain in a checkpoint (weights-only loading takes only plain containers):
`to_dict` and `from_dict` are the one seam between the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Best:
    """The best validation so far, by eval.best_metric."""

    metric: str  # eval.best_metric: METRIC (the mean over the val sets) or SET/METRIC
    value: float
    step: int


@dataclass
class TrainState:
    """Everything the training loop itself carries across a checkpoint (the strategy saves the rest)."""

    step: int = 0
    epoch: int = 0
    best: Best | None = None  # None until the first validation
    bad_streak: int = 0
    skipped_steps: int = 0
    wandb_id: str | None = None  # the W&B run this run logs to (salnet.run.wandb_run.choose_run_id)
    saved_step: int | None = None  # the step of the newest checkpoint (not saved in it: restored by resume)

    def offer_best(self, metric: str, value: float, is_better: Callable[[str, float, float | None], bool]) -> bool:
        """Make `value` of `metric` at this step the best if it beats the best so far; returns whether
        it did. A best decided by another metric (eval.best_metric changed on resume) is no bar: values
        of two metrics do not compare, so the first validation under the new metric starts its best.
        `is_better(metric name, value, than)`: salnet.metrics.names.is_better (the metrics know which
        way is better; this module sits below them)."""
        than = self.best.value if self.best is not None and self.best.metric == metric else None
        if not is_better(metric.rpartition("/")[2], value, than):
            return False
        self.best = Best(metric, value, self.step)
        return True

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint holds: plain values (weights-only loading), `best` as a dict ({} before any)."""
        saved = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "saved_step"}
        return {**saved, "best": asdict(self.best) if self.best else {}}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        return cls(**{**saved, "best": Best(**saved["best"]) if saved.get("best") else None})
