"""Set the optimizer: parameter groups, AdamW / SGD-Nesterov, warm-up + decay schedule.

Both strategies (DDP and DeepSpeed) build their optimizer and schedule from here, so the two
train with the same groups and the same learning rate at every step.

Parameter groups: {backbone, decoder} x {decay, no_decay}. The backbone's lr is scaled by
`optim.backbone_lr_mult` (0.1 is the SOD convention for a pretrained backbone); the backbone is the
model's `backbone` submodule, and a model.factory network without one is all decoder. Norm weights and
biases (every parameter with fewer than two dimensions) get no weight decay, as in most modern
recipes, because decaying them only fights the normalisation. `optim.no_decay_extra` adds position
embeddings / relative-position tables, class tokens, layer scales (salnet.model.layers.no_decay_kind).

`optim.layer_decay` (BEiT/Swin/ConvNeXt fine-tuning): the backbone groups are split by layer id
(salnet.model.layers.layer_ids), 'backbone/decay/layer3' and so on, each with its lr x
layer_decay^(top - id) on top of backbone_lr_mult (the group's `lr_scale`); the decoder's groups are
as without it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from salnet.config import ConfigError, OptimConfig
from salnet.model.layers import layer_ids, no_decay_kind


def group_settings(name: str, cfg: OptimConfig, lr_scale: float = 1.0) -> dict:
    """The peak lr and weight decay of the parameter group `name` ('backbone/decay', 'decoder/no_decay',
    'backbone/decay/layer3', ...); `lr_scale`: its layer-decay factor."""
    part, decay = name.split("/")[:2]
    return {
        "lr": cfg.lr * (cfg.backbone_lr_mult if part == "backbone" else 1.0) * lr_scale,
        "weight_decay": cfg.weight_decay if decay == "decay" else 0.0,
    }


def layer_decay_on(cfg: OptimConfig) -> bool:
    return cfg.layer_decay is not None and cfg.layer_decay != 1.0


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        _check_no_backbone_settings(cfg)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    layers = None
    if backbone is not None and layer_decay_on(cfg):
        named = layer_ids(backbone)
        layers = {id(p): named.ids[n] for n, p in backbone.named_parameters()}, named.top
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen BN and the like
        part = "backbone" if id(p) in backbone_ids else "decoder"
        exempt = p.ndim < 2 or no_decay_kind(name) in cfg.no_decay_extra
        decay = "no_decay" if exempt else "decay"
        key: tuple = (part, decay)
        extra = {}
        if layers is not None and part == "backbone":
            layer, top = layers[0][id(p)], layers[1]
            key = (part, layer, decay)
            extra = {"lr_scale": cfg.layer_decay ** (top - layer)}
        if key not in groups:
            group_name = "/".join([part, decay] + [f"layer{key[1]}"] * (len(key) == 3))
            groups[key] = {"name": group_name, "params": [], **group_settings(group_name, cfg, **extra), **extra}
        groups[key]["params"].append(p)
    # A fixed order (not dict insertion order of whatever came first) keeps optimizer state
    # indices identical across strategies and runs.
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1] if len(k) == 3 else 0, k[-1]))]


def _check_no_backbone_settings(cfg: OptimConfig) -> None:
    """A network without a `backbone` submodule (a model.factory's may have none) has only decoder
    groups: a backbone setting other than its default would be silently ignored, so it is an error
    (the default: a resolved config, as a Slurm job's, holds every key)."""
    wrong = [f"optim.layer_decay={cfg.layer_decay}"] if layer_decay_on(cfg) else []
    if cfg.backbone_lr_mult != OptimConfig.model_fields["backbone_lr_mult"].default:
        wrong.append(f"optim.backbone_lr_mult={cfg.backbone_lr_mult}")
    if wrong:
        raise ConfigError(
            f"{' and '.join(wrong)} apply to a network's `backbone` submodule, and this network has none: every "
            f"parameter trains at optim.lr; leave {' and '.join(w.split('=')[0] for w in wrong)} at the default, or "
            f"give the network a `backbone` attribute"
        )


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's peak lr for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps  # linear ramp, never exactly 0
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # poly
        shape = (1.0 - progress) ** cfg.poly_power
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (skipped steps included, so lr follows the step count)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def apply_settings(schedule: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig) -> None:
    """After a resume: the config's learning rates, weight decay and momentum take effect, not the
    values the checkpoint's optimizer and schedule state brought back. The schedule's shape
    (warm-up, decay, steps) is the config's already: its lambda is built from it, not saved."""
    optimizer = schedule.optimizer
    for group in optimizer.param_groups:
        settings = group_settings(group["name"], cfg, group.get("lr_scale", 1.0))
        group["initial_lr"], group["weight_decay"] = settings["lr"], settings["weight_decay"]
        if "betas" in group:
            group["betas"] = (cfg.momentum, cfg.beta2)
        else:
            group["momentum"] = cfg.momentum
    schedule.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * factor(schedule.last_epoch)  # the lr of the next step
