"""The memory side of `python -m salnet.bench plan`: what one GPU holds for a config, term by term.

Model states (weights, gradients, optimizer states, communication buffers) are counted from the
parameter shapes alone, in the layout salnet's strategies really use, as measured on CPU ranks
(tests/test_bench_plan.py checks every term against a real 2-rank step):
- bf16 is torch autocast under both strategies (salnet.strategy.zero_config): weights, gradients
  and optimizer states stay float32; autocast adds bf16 copies of the weights, kept for backward.
- DDP: every rank holds all weights, all gradients (p.grad), DDP's reducer buckets (a second
  gradient copy: salnet leaves gradient_as_bucket_view off) and the optimizer state of every
  parameter (AdamW: exp_avg, exp_avg_sq and a float32 `step` per tensor; SGD: a momentum buffer).
- ZeRO-1/2 (DeepSpeed 0.19): the weights stay whole on every rank, in one flat buffer per
  parameter group padded to a multiple of 2 x world elements; a rank keeps a float32 master copy and
  the optimizer states of its 1/world of each group, and the gradients of the whole parameters that
  touch that share (the ones cut at its edges whole; DeepSpeed's stage 1 reduces into gradient
  partitions just as stage 2 does: measured). Per GPU is the largest rank's.
- ZeRO-3: each parameter is cut into world pieces of ceil(numel / world) elements; a rank holds its
  piece of the weights, gradients, master copy and optimizer states, whole copies of the parameters
  DeepSpeed keeps persistent (numel <= stage3_param_persistence_threshold, default 1e5), a reduce
  bucket of train.bucket_mb, and during the step the parameters it gathers: DeepSpeed's defaults
  (stage3_max_live_parameters and stage3_max_reuse_distance 1e9) let a network under 1e9 parameters
  stay gathered whole, which is the bound counted here (stage3_max_live_parameters, if the config's
  `deepspeed:` section sets it, lowers it).

Activations are measured, not estimated: the network and salnet's loss run one training-mode
forward at the largest training size (data.multiscale's largest, else data.size: the peak), and
torch.autograd.graph.saved_tensors_hooks counts the bytes autograd keeps for backward (each storage
once; parameters excluded). fp32 runs on the meta device: exact shapes, no memory, no arithmetic,
a second or two even for Swin-B at 448 px. Autocast does not apply to meta tensors, so bf16 runs on
real CPU tensors (10-30 s and 2.5-3.5 GB of RAM for Swin-B at 384-448 px), under CPU autocast,
whose casting lists are close to CUDA's but not identical. Two batch sizes separate the per-image
bytes (the slope: activations scale with the micro-batch) from the constant part (autocast's bf16
weight copies).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from salnet.config import Config

FLOAT32 = 4
# DeepSpeed pads each ZeRO-1/2 group's flat buffer to a multiple of this times the world size
# (stage_1_and_2.py: nccl_start_alignment_factor, "4-byte alignment / sizeof(fp16)").
ZERO12_ALIGNMENT = 2
# DeepSpeed's defaults of the ZeRO-3 settings the model reads (a config's `deepspeed:` section may set them).
ZERO3_DEFAULTS = {"stage3_param_persistence_threshold": 100_000, "stage3_max_live_parameters": 1_000_000_000}
STATE_FLOATS = {"adamw": 2, "sgd": 1}  # optimizer state tensors per parameter element
# Two batch sizes for the activation slope; two at least, because the PPM's 1x1 bin is BatchNorm
# over one value per channel and image (salnet.model.cost.TRAIN_COUNT_BATCH).
ACTIVATION_BATCHES = (2, 3)


@dataclass(frozen=True)
class ModelShape:
    """The numels of a network's trainable parameters, per optimizer group in salnet's group order."""

    groups: tuple[tuple[int, ...], ...]

    @property
    def numels(self) -> list[int]:
        return [n for group in self.groups for n in group]

    @property
    def total(self) -> int:
        return sum(self.numels)


def model_shape(cfg: Config) -> ModelShape:
    """The parameter groups salnet.optim builds for `cfg`'s network, built on the meta device."""
    from salnet.model.cost import meta_model
    from salnet.optim import param_groups

    groups = param_groups(meta_model(cfg.model), cfg.optim)
    return ModelShape(tuple(tuple(p.numel() for p in group["params"]) for group in groups))


def _zero12_partition(group_numel: int, world: int) -> int:
    align = ZERO12_ALIGNMENT * world
    return math.ceil(group_numel / align) * align // world


def _zero12_gradient_buffer(groups: tuple[tuple[int, ...], ...], world: int) -> int:
    """Elements of the largest rank's ZeRO-1/2 gradient buffer: DeepSpeed sizes it to the whole
    parameters that touch the rank's partition of each group, the ones cut at its edges included
    (stage_1_and_2.py: get_partition_info, grads_in_partition)."""
    largest = 0
    for rank in range(world):
        total = 0
        for group in groups:
            part = _zero12_partition(sum(group), world)
            start, end, offset = part * rank, part * (rank + 1), 0
            for numel in group:
                if start <= offset < end or offset < start < offset + numel:
                    total += numel
                offset += numel
            if rank == world - 1:  # the group's alignment padding ends the last rank's share (measured)
                total += part * world - sum(group)
        largest = max(largest, total)
    return largest


def zero_setting(cfg: Config, key: str, default):
    """zero_optimization.KEY as the run gets it: the `deepspeed:` pass-through's value, else `default`."""
    value = (cfg.deepspeed or {}).get("zero_optimization", {}).get(key)
    return default if value is None else value


def check_modelled(cfg: Config) -> None:
    """Refuse what the model does not cover, naming the setting."""
    train = cfg.train
    if train.amp == "fp16" or train.offload_optimizer or train.offload_params:
        raise ValueError(
            "salnet.bench plan models train.amp=fp32|bf16 on the GPU alone; fp16 (DeepSpeed's fp16 mode keeps fp16 "
            "weights and fp32 masters) and train.offload_optimizer/offload_params (states in CPU memory) are not "
            "modelled: set train.amp=bf16 or fp32 and the offload settings to false"
        )


def model_states(shape: ModelShape, cfg: Config, world: int) -> dict[str, int]:
    """Bytes per GPU of weights, gradients, optimizer states (master copies included) and buffers
    (DDP's reducer buckets, ZeRO-3's reduce bucket and gathered parameters), for `world` ranks."""
    train, optim = cfg.train, cfg.optim
    check_modelled(cfg)
    states = STATE_FLOATS[optim.name] if optim.momentum > 0 or optim.name == "adamw" else 0
    step_bytes = FLOAT32 if optim.name == "adamw" else 0  # AdamW's float32 `step`, one per tensor it steps
    if train.strategy == "ddp":
        full = shape.total * FLOAT32
        return {
            "weights": full,
            "gradients": full,
            "optimizer": states * full + step_bytes * len(shape.numels),
            "buffers": full if world > 1 else 0,  # DDP's reducer buckets: a second copy of the gradients
        }
    if train.zero_stage in (1, 2):
        padded = [_zero12_partition(sum(group), world) for group in shape.groups]
        part = sum(padded) * FLOAT32
        return {
            "weights": sum(p * world for p in padded) * FLOAT32,
            "gradients": _zero12_gradient_buffer(shape.groups, world) * FLOAT32,
            "optimizer": part + states * part + step_bytes * len(shape.groups),  # master copy + states
            "buffers": 0,  # the reduce bucket lives inside backward only (freed before the step)
        }
    piece = [math.ceil(n / world) for n in shape.numels]
    part = sum(piece) * FLOAT32
    # A persistent parameter's storage has its padded size, world pieces of ceil(numel / world) (measured).
    threshold, max_live = (int(float(zero_setting(cfg, key, value))) for key, value in ZERO3_DEFAULTS.items())
    persistent = sum(p * world for p, n in zip(piece, shape.numels) if n <= threshold) * FLOAT32
    gathered = min(shape.total, max_live) * FLOAT32
    return {
        "weights": part + persistent,
        "gradients": part,
        "optimizer": part + states * part + step_bytes * len(shape.groups),
        "buffers": train.bucket_mb * 2**20 + (gathered if world > 1 else 0),
    }


def layout(cfg: Config) -> dict[str, str]:
    """How each model-state term is laid out across the ranks under `cfg`'s strategy (P: parameters,
    n: ranks, 4 B: float32): the formulas model_states counts."""
    states = {"adamw": "AdamW exp_avg + exp_avg_sq (8 B x P", "sgd": "SGD momentum (4 B x P"}[cfg.optim.name]
    if cfg.train.strategy == "ddp":
        return {
            "weights": "4 B x P, whole on every rank",
            "gradients": "4 B x P (p.grad), whole on every rank",
            "optimizer": f"{states}) + a float32 step per tensor, whole on every rank",
            "buffers": "DDP's reducer buckets: 4 B x P more (with n > 1)",
        }
    if cfg.train.zero_stage in (1, 2):
        return {
            "weights": "4 B x P, whole on every rank (one flat buffer per group, padded to 2n elements)",
            "gradients": "4 B x P / n: the parameters touching this rank's partition, those cut at its edges whole",
            "optimizer": f"fp32 master 4 B x P / n + {states} / n) + a step per group",
            "buffers": "none between steps (the reduce bucket lives inside backward)",
        }
    return {
        "weights": "4 B x ceil(numel / n) per parameter + whole persistent parameters (numel <= 1e5)",
        "gradients": "4 B x ceil(numel / n) per parameter",
        "optimizer": f"fp32 master + {states} / n), per-parameter pieces, + a step per group",
        "buffers": "reduce bucket (train.bucket_mb) + gathered weights, up to 4 B x P",
    }


@dataclass(frozen=True)
class Activations:
    """Bytes autograd saves for backward: `per_image` (x micro-batch) and `constant` (autocast's weight copies)."""

    per_image: int
    constant: int
    device: str  # where they were measured: meta (fp32) or cpu (bf16)
    size: int  # at what input px

    def at(self, batch: int) -> int:
        return self.per_image * batch + self.constant


class SavedTensors:
    """While active: the bytes of the tensors autograd saves for backward, each storage once, those of
    `exclude` (the parameters) left out. The storages stay referenced until the counter is dropped, so
    no address is reused by a later storage and counted as the same one."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.sizes: dict[int, int] = {}
        self._kept: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.exclude:
            self.sizes[storage._cdata] = max(self.sizes.get(storage._cdata, 0), storage.nbytes())
            self._kept.append(storage)
        return tensor

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def saved_bytes(model: torch.nn.Module, loss_fn, image: torch.Tensor, target: torch.Tensor, amp_dtype) -> int:
    """Bytes autograd keeps for backward over one forward of `model` and `loss_fn` on `image`, under
    autocast to `amp_dtype` when given. On the meta device the loss runs on CPU zeros of the outputs'
    shapes (its autocast guard needs a real device type): per-pixel tensors, cheap at any size."""
    with SavedTensors(exclude=model.parameters()) as saved:
        cast = torch.autocast(image.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with cast:
            outputs = model(image)
        if image.device.type == "meta":
            outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs
            outputs = [torch.zeros(o.shape, dtype=o.dtype, requires_grad=True) for o in outputs]
            target = torch.zeros(target.shape)
        loss_fn(outputs, target)
    return saved.total


def training_sizes(cfg: Config) -> list[int]:
    """The input sizes training batches take: data.multiscale's, or data.size alone."""
    return list(cfg.data.multiscale) or [cfg.data.size]


def activations(cfg: Config) -> Activations:
    """`cfg`'s network and loss in training mode at its largest training size (the peak): see the
    module's docstring."""
    from salnet.loss import build_loss
    from salnet.model import build_model
    from salnet.model.cost import meta_model
    from salnet.model.weights import NO_WEIGHTS

    bf16 = cfg.train.amp == "bf16"
    device = "cpu" if bf16 else "meta"
    if bf16:
        backbone = cfg.model.backbone.model_copy(update={"weights": NO_WEIGHTS})
        model = build_model(cfg.model.model_copy(update={"backbone": backbone}))
    else:
        model = meta_model(cfg.model)
    model.train()
    loss_fn = build_loss(cfg.loss)
    size = max(training_sizes(cfg))
    counts = []
    for batch in ACTIVATION_BATCHES:
        image = torch.zeros(batch, 3, size, size, device=device)
        target = torch.zeros(batch, 1, size, size, device=device)
        counts.append(saved_bytes(model, loss_fn, image, target, torch.bfloat16 if bf16 else None))
    (b0, b1), (c0, c1) = ACTIVATION_BATCHES, counts
    per_image = (c1 - c0) // (b1 - b0)
    return Activations(per_image=per_image, constant=max(0, c0 - per_image * b0), device=device, size=size)
