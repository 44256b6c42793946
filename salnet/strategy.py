"""The only module that knows DDP from DeepSpeed.

A strategy owns everything between "here is a batch and a loss function" and "the weights have
moved": wrapping the model, precision (autocast, gradient scaler), gradient accumulation and its
communication, clipping, the agreed-on skip of non-finite steps, the optimizer and lr schedule,
and saving/loading that state. The trainer talks to it through `Strategy` only.

Non-finite handling: every rank contributes a flag to one all-reduce per optimizer step, so all
ranks skip together; a NaN on one rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from salnet import dist
from salnet.config import Config
from salnet.optim import build_optimizer, build_schedule

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

    def forward_backward(self, image: torch.Tensor, target: torch.Tensor, loss_fn: Callable, sync: bool):
        raise NotImplementedError

    def optimizer_step(self) -> StepResult:
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def autocast(self):
        raise NotImplementedError

    def save(self, directory: Path, client_state: dict) -> None:
        """Write the full training state (all ranks call this) into `directory`."""
        raise NotImplementedError

    def load(self, directory: Path) -> dict:
        """Restore the training state from `directory`; returns the client state saved with it."""
        raise NotImplementedError

    def fp32_state_dict(self) -> dict:
        """Consolidated float32 weights of the plain network (same format for every strategy)."""
        raise NotImplementedError


def decoder_lr(optimizer: torch.optim.Optimizer) -> float:
    """The decoder's current lr (the backbone's is this x optim.backbone_lr_mult): what logs show."""
    for group in optimizer.param_groups:
        if group.get("name", "").startswith("decoder"):
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


def fp32_copy(state: dict) -> dict:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in state.items()}


class DDPStrategy(Strategy):
    """DistributedDataParallel (or the bare module in a single process)."""

    def __init__(self, cfg: Config, model: nn.Module, total_steps: int):
        self.cfg = cfg
        device = dist.device()
        train = cfg.train
        if train.sync_bn and device.type != "cuda":
            raise ValueError("train.sync_bn=true needs CUDA: torch's SyncBatchNorm is GPU-only; "
                             "on CPU use train.sync_bn=false, or model.norm=group for small per-rank batches")
        if train.sync_bn and dist.world_size() > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device, memory_format=torch.channels_last if train.channels_last else torch.preserve_format)
        self.module = model
        # The optimizer is built on the plain module's parameters before wrapping: DDP and
        # compile share them, and checkpoints then never depend on wrapper prefixes.
        self.optimizer = build_optimizer(model, cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.optim, total_steps)
        if dist.world_size() > 1:
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=train.bucket_mb, static_graph=train.static_graph)
        self._ddp = model if isinstance(model, DistributedDataParallel) else None
        self.model = torch.compile(model) if train.compile else model
        # Validation bypasses the DDP wrapper: its forward would broadcast BatchNorm buffers, a
        # collective that ranks holding different numbers of val batches cannot match.
        self.eval_model = self.module
        self.amp_dtype = AMP_DTYPES.get(train.amp)
        # A gradient scaler only for fp16: bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.amp == "fp16")
        self.grad_accum = train.grad_accum
        self._loss_finite = torch.ones((), dtype=torch.bool, device=device)

    def autocast(self):
        return torch.autocast(dist.device().type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def forward_backward(self, image, target, loss_fn, sync: bool):
        # no_sync on all but the last micro-step: gradients are all-reduced once per optimizer step.
        no_sync = self._ddp.no_sync() if (self._ddp is not None and not sync) else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                outputs = self.model(image)
            total, parts = loss_fn(outputs, target)  # the loss computes in float32 itself
            self.scaler.scale(total / self.grad_accum).backward()
        self._loss_finite &= torch.isfinite(total.detach())
        return total.detach(), parts

    def optimizer_step(self) -> StepResult:
        self.scaler.unscale_(self.optimizer)  # clip on true gradients, not scaled ones
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip is not None else math.inf)
        loss_bad = not bool(self._loss_finite)
        grads_bad = not bool(torch.isfinite(norm))
        # One collective decides for all ranks: 2 = a non-finite loss somewhere, 1 = non-finite grads.
        verdict = dist.all_reduce_scalar(2 * loss_bad + grads_bad, "max") if dist.world_size() > 1 else 2 * loss_bad + grads_bad
        skipped = None
        if verdict >= 2:
            skipped = "non-finite loss"
        elif verdict >= 1 and not self.scaler.is_enabled():
            skipped = "non-finite gradients"
        if skipped is None:
            # Under fp16 an overflow is the scaler's business: it skips the step and lowers the scale.
            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if scale_before is not None and self.scaler.get_scale() < scale_before:
                skipped = "fp16 overflow (scale lowered)"
        elif self.scaler.is_enabled():
            self.scaler.update()
        with warnings.catch_warnings():
            # The schedule follows the step count even over a skipped step; torch warns about
            # stepping it without optimizer.step(), which is exactly what is meant here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss_finite.fill_(True)
        return StepResult(grad_norm=float(norm), skipped=skipped)

    def lr(self) -> float:
        return decoder_lr(self.optimizer)

    def save(self, directory: Path, client_state: dict) -> None:
        # DDP keeps identical replicas: rank 0 writes everything.
        if dist.is_main():
            torch.save({
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "client": client_state,
            }, directory / "state.pt")

    def load(self, directory: Path) -> dict:
        state = torch.load(directory / "state.pt", map_location=dist.device(), weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        return state["client"]

    def fp32_state_dict(self) -> dict:
        return fp32_copy(self.module.state_dict())


def build_strategy(cfg: Config, model: nn.Module, total_steps: int) -> Strategy:
    if cfg.train.strategy == "ddp":
        return DDPStrategy(cfg, model, total_steps)
    raise ValueError(f"train.strategy={cfg.train.strategy!r} is not available yet; valid: 'ddp'")
