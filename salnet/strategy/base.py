"""The Strategy interface and what its implementations share."""

from __future__ import annotations

import enum
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from salnet import dist
from salnet.config import SYNC_BN_NEEDS_CUDA, Config, ConfigError
from salnet.data import to_model_input
from salnet.run.checksums import FileDigest

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class SkipReason(enum.Enum):
    """Why an optimizer step was not applied (the same verdict on every rank)."""

    NON_FINITE_LOSS = "non-finite loss"
    NON_FINITE_GRADIENTS = "non-finite gradients"
    FP16_OVERFLOW = "fp16 overflow (scale lowered)"  # the gradient scaler's routine, not a sign of divergence

    @property
    def diverging(self) -> bool:
        """Counts towards train.max_bad_steps."""
        return self is not SkipReason.FP16_OVERFLOW

    def __str__(self) -> str:
        return self.value


@dataclass
class StepResult:
    grad_norm: float
    skipped: SkipReason | None = None  # why the optimizer step was skipped, None if it was taken
    stop: int = 0  # the largest stop code any rank asked for (0: none): every rank gets the same answer


class Strategy(ABC):
    """What the trainer, validation and checkpoints use; DDPStrategy is the reference implementation.

    Implementations set `module` (the plain network underneath any wrapper: what checkpoints and
    best.pt hold), `amp_dtype`, and implement the abstract methods.
    """

    # ZeRO-3 gathers parameters collectively inside forward: every rank must run the same
    # number of forward passes, so validation adds flagged padding batches.
    needs_equal_forward_passes = False

    module: nn.Module
    schedule: torch.optim.lr_scheduler.LambdaLR  # salnet's lr schedule, over the optimizer that steps
    amp_dtype: torch.dtype | None = None  # autocast dtype of train.amp; None for fp32

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abstractmethod
    def train(self) -> None:
        """Put the network, and any wrapper around it, in training mode (before stepping again)."""

    @abstractmethod
    def forward_backward(
        self, image: torch.Tensor, target: torch.Tensor, loss_fn: Callable, sync: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; `sync` on the last one of an optimizer step."""

    @abstractmethod
    def optimizer_step(self, stop: int = 0) -> StepResult:
        """Apply the accumulated gradients (or skip on every rank together), step the schedule.

        `stop`: this rank's stop code (a preemption signal's exit code; 0: none). The result's
        `stop` is the largest over all ranks, agreed in a collective the step does anyway where
        the strategy has one.
        """

    @abstractmethod
    def lr(self) -> float:
        """The decoder's current learning rate (what logs show)."""

    def autocast(self):
        return autocast(self.amp_dtype)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Fused float32 logits [B, 1, H, W] for a uint8 batch [B, 3, H, W], in eval mode.

        Runs the plain module, never a wrapper: no gradient hooks, and ranks holding different
        numbers of val batches never meet in one of DDP's collectives. Call `train()` afterwards.
        """
        return predict_logits(self.module, images, self.amp_dtype, self.cfg.train.channels_last)

    @abstractmethod
    def save(self, directory: Path, client_state: dict) -> dict[str, FileDigest]:
        """Write the full training state (all ranks call this) into `directory`; returns the
        digests of the files this rank wrote, by path relative to `directory`."""

    @abstractmethod
    def load(self, directory: Path) -> dict:
        """Restore the training state from `directory`; returns the client state saved with it."""

    @abstractmethod
    def fp32_state_dict(self) -> dict:
        """Consolidated float32 weights of the plain network (same format for every strategy).

        All ranks call this: under ZeRO the weights are gathered from every rank's partition.
        """


def autocast(amp_dtype: torch.dtype | None, device: torch.device | None = None):
    """Autocast to `amp_dtype` on this rank's device (None: a disabled context, fp32)."""
    return torch.autocast(
        (device or dist.device()).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )


@torch.no_grad()
def predict_logits(
    module: nn.Module,
    images: torch.Tensor,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    device: torch.device | None = None,
) -> torch.Tensor:
    """A network's fused float32 logits for a uint8 batch: eval mode, normalised input, autocast.

    What validation runs, for a strategy's module or any plain SalNet (evaluation, tests)."""
    device = device or dist.device()
    module.eval()
    with autocast(amp_dtype, device):
        return module(to_model_input(images, device, channels_last)).float()


def decoder_lr(optimizer: torch.optim.Optimizer) -> float:
    """The decoder's current lr (the backbone's is this x optim.backbone_lr_mult): what logs show."""
    for group in optimizer.param_groups:
        if group.get("name", "").startswith("decoder"):
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


def fp32_copy(state: dict) -> dict:
    """A float32 CPU snapshot: copied even where .float().cpu() would hand back the live tensor
    (float32 on CPU), so later steps and forward passes cannot change what was taken."""
    return {
        k: v.detach().to(
            "cpu", torch.float32 if v.is_floating_point() else v.dtype, memory_format=torch.contiguous_format, copy=True
        )
        for k, v in state.items()
    }


def with_sync_bn(model: nn.Module, cfg: Config) -> nn.Module:
    """`model` with SyncBatchNorm if train.sync_bn asks for it (and there is more than one rank)."""
    if cfg.train.sync_bn and dist.device().type != "cuda":
        raise ConfigError(SYNC_BN_NEEDS_CUDA)  # salnet.train refuses it sooner where no GPU is certain
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
