"""The only package that knows DDP from DeepSpeed.

A strategy owns everything between "here is a batch and a loss function" and "the weights have
moved": wrapping the model, precision (autocast, gradient scaler), gradient accumulation and its
communication, clipping, the agreed-on skip of non-finite steps, the optimizer and lr schedule,
and saving/loading that state. The trainer talks to it through `Strategy` only.

    base.py         the interface and what both implementations share
    ddp.py          train.strategy=ddp: DistributedDataParallel (or the bare module in one process)
    zero.py         train.strategy=deepspeed: DeepSpeed ZeRO stages 1-3, CPU offload
    zero_config.py  the DeepSpeed JSON generated from salnet's config
    convert.py      `python -m salnet.strategy.convert`: a checkpoint of either to best.pt's format
"""

from torch import nn

from salnet.config import Config
from salnet.strategy.base import SkipReason, StepResult, Strategy

__all__ = ["SkipReason", "StepResult", "Strategy", "build_strategy"]


def build_strategy(cfg: Config, model: nn.Module, total_steps: int) -> Strategy:
    if cfg.train.strategy == "deepspeed":
        from salnet.strategy.zero import DeepSpeedStrategy  # imports DeepSpeed (seconds): only when asked for

        return DeepSpeedStrategy(cfg, model, total_steps)
    from salnet.strategy.ddp import DDPStrategy

    return DDPStrategy(cfg, model, total_steps)
