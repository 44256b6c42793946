"""A best.pt as a network ready to predict, and the plumbing the entry points share.

- `load_best_weights`: best.pt's network (float32, eval mode, on the CPU), built from its own config.
  The backbone's pretrained file is never read (best.pt holds every weight), so the best.pt of
  an ImageNet-initialised run loads on a machine without network or TORCH_HOME cache. (A
  "checkpoint" is always a training checkpoint, `checkpoints/step-N/`; the commands' --checkpoint
  flag takes a best.pt, or one exported from such a checkpoint by `python -m salnet.strategy.convert`.)
- `make_predict`: uint8 images -> fused logits, exactly as validation runs the network (ImageNet
  normalisation on the device, channels_last as the run had it, autocast at the run's train.amp
  unless another precision is asked for).
- `raise_if_any`: every rank calls it after its share of the work; an error on any rank is raised
  on all of them, so no rank is left waiting in a collective for one that has stopped.
- `output_dirs`: the commands' --out folders, made and written to once before any work, so that a
  file in the way or a folder that cannot be written is one line naming it, not a traceback at the end.
- `command_parser`, `run_main`, `run_distributed`: the commands' parser (their docstring as help),
  and the command-line error exit (one message, on rank 0 when every rank has it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from salnet import dist
from salnet.config import ConfigError, ModelConfig
from salnet.data import DataError, to_model_input
from salnet.model import build_model
from salnet.run.checkpoint import CONFIG as CHECKPOINT_CONFIG
from salnet.run.checkpoint import load_best
from salnet.run.checksums import MANIFEST as CHECKSUMS
from salnet.run.rundir import RunDir
from salnet.shards.manifest import ShardsError

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LIST_LIMIT = 20  # problem files a message names before "... and N more"

# uint8 images [B, 3, H, W] -> float32 fused logits [B, 1, H, W] on this rank's device
Predict = Callable[[torch.Tensor], torch.Tensor]


class EvaluationError(RuntimeError):
    """A problem with what predict, evaluate or export were given; the message names the file, key or value."""

    on_every_rank = False  # set by raise_if_any: every rank raises the same message


@dataclass
class BestWeights:
    """A best.pt, loaded: its network and what it says about itself."""

    path: Path
    model: torch.nn.Module  # float32, eval mode, on the CPU
    config: dict[str, Any]  # the run's resolved config, as best.pt keeps it
    step: int | None
    metrics: dict[str, float]  # what validation logged for these weights

    @property
    def run_name(self) -> str:
        return str(self.config.get("name") or self.path.parent.name)

    def setting(self, section: str, key: str, default: Any) -> Any:
        """config[section][key], or `default` where an older best.pt lacks it."""
        return (self.config.get(section) or {}).get(key, default)

    def precision(self, requested: str | None = None) -> str:
        """`requested`, else the precision the run validated with (train.amp), so that scores match the logged ones."""
        if requested is not None:
            return requested
        amp = self.setting("train", "amp", "fp32")
        return amp if amp in PRECISIONS else "fp32"


def load_best_weights(path: os.PathLike | str) -> BestWeights:
    path = Path(path)
    if path.is_dir():
        raise EvaluationError(_not_a_best_pt(path))
    if not path.is_file():
        raise EvaluationError(f"checkpoint '{path}' does not exist")
    try:
        best = load_best(path)
    except Exception as e:  # torch.load's errors have many types (pickle, zip, weights_only)
        raise EvaluationError(f"checkpoint '{path}' cannot be read as a salnet best.pt: {e}") from None
    missing = [key for key in ("model", "config") if not isinstance(best, dict) or key not in best]
    if missing:
        raise EvaluationError(
            f"checkpoint '{path}' has no {' and no '.join(repr(k) for k in missing)}: it is not a salnet best.pt "
            "(a training checkpoint directory exports to one with `python -m salnet.strategy.convert`)"
        )
    model_section = dict(best["config"].get("model") or {})
    model_section["backbone"] = {**(model_section.get("backbone") or {}), "weights": "none"}  # best.pt holds them all
    try:
        model_cfg = ModelConfig.model_validate(model_section)
    except ValidationError as e:
        raise EvaluationError(f"checkpoint '{path}': its 'model' config is not valid for this salnet: {e}") from None
    try:
        model = build_model(model_cfg)  # a model.factory network: its module must be importable here too
    except ConfigError as e:
        raise EvaluationError(f"checkpoint '{path}': {e}") from None
    try:
        model.load_state_dict(best["model"])
    except RuntimeError as e:
        raise EvaluationError(
            f"checkpoint '{path}': its weights do not fit the network its config describes: {e}"
        ) from None
    model.eval()
    return BestWeights(path, model, best["config"], best.get("step"), dict(best.get("metrics") or {}))


def _not_a_best_pt(directory: Path) -> str:
    """What the folder given as a best.pt is, and what to pass instead."""
    if (directory / CHECKSUMS).is_file() or (directory / CHECKPOINT_CONFIG).is_file():
        run_best = RunDir(directory.parent.parent).best  # a checkpoint is runs/NAME/checkpoints/step-N
        also = (
            f" (or pass the run's best.pt, {run_best}: the weights that validated best)" if run_best.is_file() else ""
        )
        return (
            f"checkpoint '{directory}' is a training checkpoint folder, not a best.pt: export its weights "
            f"with `python -m salnet.strategy.convert {directory} OUT_DIR` and pass OUT_DIR/best.pt{also}"
        )
    if RunDir(directory).best.is_file():
        return f"checkpoint '{directory}' is a folder: pass the best.pt inside it, {RunDir(directory).best}"
    return f"checkpoint '{directory}' is a folder, not a best.pt (a run's best.pt, or one exported by convert)"


def output_dirs(*paths: Path, flag: str = "--out") -> None:
    """Every rank calls this: each of `paths` made a writable folder (with its parents), or on every rank
    an EvaluationError naming it and why. Checked before the work, so a long run does not fail at its
    first write."""
    error = None
    for path in paths:
        if path.exists() and not path.is_dir():
            error = f"{flag} '{path}' is a file, not a folder"
            break
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):  # a real write: permissions, a read-only mount, quotas
                pass
        except OSError as e:
            error = f"{flag} '{path}' is not a writable folder: {e.strerror or e}"
            break
    raise_if_any(error)


def make_predict(best: BestWeights, precision: str) -> Predict:
    """uint8 images -> float32 fused logits on this rank's device, as validation computes them."""
    if precision not in PRECISIONS:
        raise EvaluationError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    device = dist.device()
    channels_last = bool(best.setting("train", "channels_last", True))
    model = best.model
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).eval()
    dtype = PRECISIONS[precision]

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(to_model_input(images, device, channels_last)).float()

    return predict


def split_name(text: str) -> tuple[str | None, str]:
    """'NAME=VALUE' -> (NAME, VALUE). Without '=' (or with a path separator before it): (None, text)."""
    name, sep, value = text.partition("=")
    if not sep or not name or "/" in name or "\\" in name:
        return None, text
    if name in (".", "..") or not value:
        raise EvaluationError(f"'{text}': expected NAME=PATH with a NAME usable as a folder name and a PATH")
    return name, value


def check_name(name: str, what: str) -> str:
    """A dataset or method name: it becomes a folder or file name, so no separators."""
    if not name or name in (".", "..") or re.search(r"[/\\\x00]", name):
        raise EvaluationError(f"{what} name {name!r} cannot be a folder name; give one with NAME=PATH")
    return name


def names_listed(items: list[str]) -> str:
    shown = ", ".join(items[:LIST_LIMIT])
    return shown + (f" ... and {len(items) - LIST_LIMIT} more ({len(items)} in all)" if len(items) > LIST_LIMIT else "")


def raise_if_any(error: str | None) -> None:
    """All ranks call this: if any rank reports an error, every rank raises it (naming the rank)."""
    errors = dist.all_gather_object(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    message = failed[0][1] if len(errors) == 1 else "\n".join(f"rank {r}: {e}" for r, e in failed)
    exc = EvaluationError(message)
    exc.on_every_rank = True
    raise exc


def command_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A command's parser: the docstring's first paragraph is the description, the rest the epilog."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(
        prog=prog, description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def run_distributed(prog: str, work: Callable[[], Any]) -> None:
    """`work` on every rank inside the process group, with the command-line error exit."""

    def run() -> None:
        with dist.distributed():
            work()

    run_main(prog, run)


def run_main(prog: str, main: Callable[[], None]) -> None:
    """Run `main`; a user error prints one line (from rank 0 when every rank has it) and exits 1."""
    try:
        main()
    except (EvaluationError, ShardsError, DataError, ConfigError) as e:
        rank = int(os.environ.get("RANK", "0") or 0)
        if rank == 0 or not getattr(e, "on_every_rank", False):
            where = f"rank {rank}: " if rank and not getattr(e, "on_every_rank", False) else ""
            print(f"{prog}: error: {where}{e}", file=sys.stderr, flush=True)
        sys.exit(1)
