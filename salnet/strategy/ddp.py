"""DDP (train.strategy=ddp): DistributedDataParallel, or the bare module in a single process.

Non-finite handling: every rank contributes a flag to one all-reduce per optimizer step, so all
ranks skip together; a NaN on one rank never leaves the others waiting in a collective. The same
all-reduce carries each rank's stop request (a preemption signal), so agreeing on it is free.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from salnet import dist
from salnet.config import Config
from salnet.optim import build_optimizer, build_schedule
from salnet.run.checksums import FileDigest, load_file, save_hashed
from salnet.strategy.base import (
    AMP_DTYPES,
    SkipReason,
    StepResult,
    Strategy,
    broadcast_buffers,
    decoder_lr,
    fp32_copy,
    step_schedule,
    with_sync_bn,
)

STATE_FILE = "state.pt"  # a DDP checkpoint is this one file, written by rank 0


class DDPStrategy(Strategy):
    """DistributedDataParallel (or the bare module in a single process)."""

    def __init__(self, cfg: Config, model: nn.Module, total_steps: int):
        super().__init__(cfg)
        device = dist.device()
        train = cfg.train
        model = with_sync_bn(model, cfg)
        model = model.to(device, memory_format=torch.channels_last if train.channels_last else torch.preserve_format)
        self.module = model
        # The optimizer is built on the plain module's parameters before wrapping: DDP and
        # compile share them, and checkpoints then never depend on wrapper prefixes.
        self.optimizer = build_optimizer(model, cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.optim, total_steps)
        if dist.world_size() > 1:
            model = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=train.bucket_mb,
                static_graph=train.static_graph,
                # Resume is bitwise only if every attempt sums the gradients in the same buckets. By
                # default DDP regroups its buckets after an attempt's first backward (by the order the
                # gradients became ready), so a resumed attempt's first step would reduce in the
                # initial grouping where the uninterrupted run used the regrouped one; with 3+ ranks
                # the ring's summation order, and so the rounding, follows the grouping (two ranks'
                # a + b is the same either way). Looking for unused parameters turns the regrouping
                # off: one walk over the autograd graph per step, and torch's warning, once per
                # rank, that none were found. static_graph brings the regrouping back (config.py).
                find_unused_parameters=dist.world_size() > 2 and not train.static_graph,
                # BatchNorm buffers are broadcast once per optimizer step (below) instead of before
                # every forward, so validation (which bypasses the wrapper) sees rank 0's statistics.
                forward_sync_buffers=False,
            )
        self._ddp = model if isinstance(model, DistributedDataParallel) else None
        self._train_model = torch.compile(model) if train.compile else model
        self.amp_dtype = AMP_DTYPES.get(train.amp)
        # A gradient scaler only for fp16: bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.amp == "fp16")
        self.grad_accum = train.grad_accum
        self._loss_finite = torch.ones((), dtype=torch.bool, device=device)

    def train(self) -> None:
        self._train_model.train()

    def forward_backward(self, image, target, loss_fn, sync: bool):
        # no_sync on all but the last micro-step: gradients are all-reduced once per optimizer step.
        no_sync = self._ddp.no_sync() if (self._ddp is not None and not sync) else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                outputs = self._train_model(image)
            total, parts = loss_fn(outputs, target)  # the loss computes in float32 itself
            self.scaler.scale(total / self.grad_accum).backward()
        self._loss_finite &= torch.isfinite(total.detach())
        return total.detach(), parts

    def optimizer_step(self, stop: int = 0) -> StepResult:
        self.scaler.unscale_(self.optimizer)  # clip on true gradients, not scaled ones
        clip = self.cfg.optim.grad_clip
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        # The norm is always needed (the non-finite check, the logs); clipping only when asked:
        # clip_grad_norm_ with an infinite limit would still rescale every gradient by 1.0.
        norm = torch.nn.utils.get_total_norm(grads)
        if clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), clip, norm)
        # One collective decides for all ranks: [2 = a non-finite loss somewhere, 1 = non-finite
        # gradients; the largest stop code].
        bad, stop_anywhere = dist.all_reduce_values(
            [2 * (not bool(self._loss_finite)) + (not bool(torch.isfinite(norm))), stop], "max"
        )
        skipped = None
        if bad >= 2:
            skipped = SkipReason.NON_FINITE_LOSS
        elif bad >= 1 and not self.scaler.is_enabled():
            skipped = SkipReason.NON_FINITE_GRADIENTS
        if skipped is None:
            # Under fp16 an overflow is the scaler's business: it skips the step and lowers the scale.
            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if scale_before is not None and self.scaler.get_scale() < scale_before:
                skipped = SkipReason.FP16_OVERFLOW
        elif self.scaler.is_enabled():
            self.scaler.update()
        step_schedule(self.schedule)
        broadcast_buffers(self.module)
        self.optimizer.zero_grad(set_to_none=True)
        self._loss_finite.fill_(True)
        return StepResult(grad_norm=float(norm), skipped=skipped, stop=int(stop_anywhere))

    def lr(self) -> float:
        return decoder_lr(self.optimizer)

    def save(self, directory: Path, client_state: dict) -> dict[str, FileDigest]:
        # DDP keeps identical replicas: rank 0 writes everything.
        if not dist.is_main():
            return {}
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "client": client_state,
        }
        return {STATE_FILE: save_hashed(state, directory / STATE_FILE)}

    def load(self, directory: Path) -> dict:
        state = load_file(directory / STATE_FILE, map_location=dist.device())
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        return state["client"]

    def fp32_state_dict(self) -> dict:
        return fp32_copy(self.module.state_dict())


def consolidated_weights(directory: Path) -> dict:
    """The fp32 weights of a DDP checkpoint directory (what `python -m salnet.strategy.convert` reads)."""
    return fp32_copy(load_file(directory / STATE_FILE, map_location="cpu")["model"])
