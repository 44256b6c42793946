"""What a run tells the world: console lines, metrics.jsonl, and (optionally) W&B. Rank 0 only.

metrics.jsonl is always written, whether or not W&B is on: it is the record a run can be
audited from. On resume, lines past the resumed step (written by the interrupted run after its
last checkpoint) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import resource
import uuid
from typing import Optional

import torch

from salnet import dist
from salnet.config import Config
from salnet.fsio import atomic_write


def peak_memory_mib() -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if dist.device().type == "cuda":
        return torch.cuda.max_memory_allocated(dist.device()) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class RunLog:
    def __init__(self, cfg: Config, resumed_step: int, wandb_id: Optional[str]):
        self.enabled = dist.is_main()
        self.path = cfg.run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resumed_step)
        if cfg.log.wandb:
            import wandb  # imported only when asked for: it is slow to import

            # The run id lives in the checkpoint, so a requeued job continues the same W&B run.
            self.wandb_id = wandb_id or uuid.uuid4().hex[:8]
            self.wandb = wandb.init(project=cfg.log.project, entity=cfg.log.entity, name=cfg.name, id=self.wandb_id,
                                    resume="allow", dir=str(cfg.run_dir), config=cfg.model_dump(mode="json"))

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        with atomic_write(self.path) as f:
            f.write("".join(line + "\n" for line in kept))

    def record(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def format_train_line(step: int, total: int, epoch: int, values: dict) -> str:
    parts = " ".join(f"{k}={v:.4f}" for k, v in values["losses"].items())
    return (f"step {step}/{total} epoch {epoch} {parts} lr={values['lr']:.3g} "
            f"img/s={values['images_per_s']:.1f} data_wait={values['data_wait']:.0%} "
            f"mem={values['peak_mem_mib']:.0f}MiB" + (f" skipped={values['skipped_steps']}" if values["skipped_steps"] else ""))


def format_metrics_table(step: int, metrics: dict, best: dict) -> str:
    names = list(metrics)
    head = " ".join(f"{n:>8}" for n in names)
    vals = " ".join(f"{metrics[n]:>8.4f}" for n in names)
    star = f"  best {best['metric']}={best['value']:.4f} @ step {best['step']}"
    return f"validation @ step {step}\n  {head}\n  {vals}\n{star}"
