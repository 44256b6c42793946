"""The Strategy interface and what its implementations share."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from salnet import dist
from salnet.config import Config

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    grad_norm: float
    skipped: Optional[str] = None  # why the optimizer step was skipped, None if it was taken


class Strategy:
    """Interface the trainer uses; see DDPStrategy for the reference implementation."""

    # ZeRO-3 gathers parameters collectively inside forward: every rank must run the same
    # number of forward passes, so validation adds flagged padding batches.
    needs_equal_forward_passes = False

    model: nn.Module          # what the trainer calls for forward (possibly wrapped/compiled)
    module: nn.Module         # the plain network underneath
    eval_model: nn.Module     # what validation calls: no gradient sync, no buffer broadcast
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype of train.amp; None for fp32

    def forward_backward(self, image: torch.Tensor, target: torch.Tensor, loss_fn: Callable, sync: bool):
        raise NotImplementedError

    def optimizer_step(self) -> StepResult:
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def autocast(self):
        return torch.autocast(dist.device().type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def save(self, directory: Path, client_state: dict) -> None:
        """Write the full training state (all ranks call this) into `directory`."""
        raise NotImplementedError

    def load(self, directory: Path) -> dict:
        """Restore the training state from `directory`; returns the client state saved with it."""
        raise NotImplementedError

    def fp32_state_dict(self) -> dict:
        """Consolidated float32 weights of the plain network (same format for every strategy).

        All ranks call this: under ZeRO the weights are gathered from every rank's partition.
        """
        raise NotImplementedError


def decoder_lr(optimizer: torch.optim.Optimizer) -> float:
    """The decoder's current lr (the backbone's is this x optim.backbone_lr_mult): what logs show."""
    for group in optimizer.param_groups:
        if group.get("name", "").startswith("decoder"):
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


def fp32_copy(state: dict) -> dict:
    """A float32 CPU snapshot: copied even where .float().cpu() would hand back the live tensor
    (float32 on CPU), so later steps and forward passes cannot change what was taken."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, memory_format=torch.contiguous_format, copy=True)
            for k, v in state.items()}


def with_sync_bn(model: nn.Module, cfg: Config) -> nn.Module:
    """`model` with SyncBatchNorm if train.sync_bn asks for it (and there is more than one rank)."""
    if cfg.train.sync_bn and dist.device().type != "cuda":
        raise ValueError("train.sync_bn=true needs CUDA: torch's SyncBatchNorm is GPU-only; "
                         "on CPU use train.sync_bn=false, or model.norm=group for small per-rank batches")
    if cfg.train.sync_bn and dist.world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def broadcast_buffers(module: nn.Module) -> None:
    """Make rank 0's BatchNorm statistics everyone's (each rank's moved with its own batches).

    Called after every optimizer step, so every rank validates, saves and exports the same network.
    """
    if dist.world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        flat = torch.cat([b.reshape(-1) for b in buffers])  # one collective, not one per buffer
        dist.broadcast_(flat, src=0)
        for buffer, synced in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(synced.view_as(buffer))


def step_schedule(schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    with warnings.catch_warnings():
        # The schedule follows the step count even over a skipped step; torch warns about
        # stepping it without optimizer.step(), which is exactly what is meant here.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        schedule.step()
