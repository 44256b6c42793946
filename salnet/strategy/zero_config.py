"""The DeepSpeed JSON config of a run, generated from salnet's config (train.strategy=deepspeed).

The user writes one YAML file. salnet derives every DeepSpeed key that has a salnet equivalent
(`derived_keys`); the `deepspeed:` section passes any other DeepSpeed key through, merged on top.
A pass-through key that salnet derives may repeat salnet's value but not contradict it: the run
stops with a message naming both keys. Two things DeepSpeed's JSON cannot express travel another
way, identical to DDP:
- the parameter groups (backbone lr multiplier, no weight decay on norms and biases) go to
  deepspeed.initialize as `model_parameters`, each group with its own lr and weight_decay
  (salnet.optim.param_groups: the groups DDP uses);
- the lr schedule is salnet's own (salnet.optim.build_schedule), stepped by the strategy once per
  optimizer step, skipped steps included. DeepSpeed's schedulers have no poly decay and warm up
  differently, so a pass-through `scheduler` is refused.

Precision: train.amp=bf16 is DeepSpeed's `torch_autocast` (fp32 weights, gradients and BatchNorm
statistics, bf16 compute: the numerics of salnet's DDP); fp16 is DeepSpeed's fp16 mode with its
dynamic loss scaler, because torch autocast in fp16 under ZeRO has no loss scaling.

Optimizer: AdamW runs as torch.optim.AdamW (`torch_adam: true`), which needs no compiler. On GPUs,
`deepspeed.optimizer.params.torch_adam=false` selects DeepSpeed's FusedAdam (built with nvcc on
first use), or with train.offload_optimizer DeepSpeedCPUAdam (built with a C++ compiler; much
faster than torch's AdamW for ZeRO-Offload's CPU-side step, and the better choice there).
SGD (Nesterov) runs as torch.optim.SGD.

This module imports neither torch nor DeepSpeed: the generated config can be built and checked
anywhere, and a conflict stops the run before DeepSpeed starts.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from salnet.config import Config, ConfigError

MISSING = object()
SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def derived_keys(cfg: Config, world_size: int) -> list[tuple[str, Any, str]]:
    """(dotted DeepSpeed key, value, the salnet setting it comes from) for every key salnet sets."""
    data, train, optim = cfg.data, cfg.train, cfg.optim
    amp = f"train.amp={train.amp}"
    bucket_elements = train.bucket_mb * 2**20 // 4  # float32 gradients
    keys = [
        ("train_micro_batch_size_per_gpu", data.batch_size, f"data.batch_size={data.batch_size}"),
        ("gradient_accumulation_steps", train.grad_accum, f"train.grad_accum={train.grad_accum}"),
        (
            "train_batch_size",
            cfg.global_batch(world_size),
            f"{world_size} ranks x data.batch_size={data.batch_size} x train.grad_accum={train.grad_accum}",
        ),
        ("gradient_clipping", optim.grad_clip or 0.0, f"optim.grad_clip={optim.grad_clip}"),
        ("zero_optimization.stage", train.zero_stage, f"train.zero_stage={train.zero_stage}"),
        # DeepSpeed's defaults (5e8 elements) suit language models: ZeRO-3 allocates its reduce
        # bucket whole, 1.9 GiB per rank, more than a ResNet-50 SalNet's model states.
        ("zero_optimization.reduce_bucket_size", bucket_elements, f"train.bucket_mb={train.bucket_mb}"),
        ("zero_optimization.allgather_bucket_size", bucket_elements, f"train.bucket_mb={train.bucket_mb}"),
        (
            "zero_optimization.offload_optimizer.device",
            "cpu" if train.offload_optimizer else "none",
            f"train.offload_optimizer={str(train.offload_optimizer).lower()}",
        ),
        (
            "zero_optimization.offload_param.device",
            "cpu" if train.offload_params else "none",
            f"train.offload_params={str(train.offload_params).lower()}",
        ),
        ("torch_autocast.enabled", train.amp == "bf16", amp),
        ("bf16.enabled", False, f"{amp} (salnet's bf16 is torch_autocast)"),
        ("fp16.enabled", train.amp == "fp16", amp),
        ("optimizer.type", {"adamw": "AdamW", "sgd": "SGD"}[optim.name], f"optim.name={optim.name}"),
        ("optimizer.params.lr", optim.lr, f"optim.lr={optim.lr}"),
        ("optimizer.params.weight_decay", optim.weight_decay, f"optim.weight_decay={optim.weight_decay}"),
    ]
    if train.amp == "bf16":
        keys.append(("torch_autocast.dtype", "bfloat16", amp))
    if train.amp == "fp16":
        keys.append(("fp16.auto_cast", True, f"{amp} (inputs cast to fp16 by DeepSpeed)"))
    if optim.name == "adamw":
        keys.append(
            (
                "optimizer.params.betas",
                [optim.momentum, optim.beta2],
                f"optim.momentum={optim.momentum}, optim.beta2={optim.beta2}",
            )
        )
    else:
        keys += [
            ("optimizer.params.momentum", optim.momentum, f"optim.momentum={optim.momentum}"),
            ("optimizer.params.nesterov", True, "optim.name=sgd (Nesterov momentum)"),
        ]
    return keys


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The JSON-able dict handed to deepspeed.initialize. Raises ConfigError on a conflict."""
    extra = _numbers_from_text(cfg.deepspeed)
    derived = derived_keys(cfg, world_size)
    _check_pass_through(extra, derived)
    if cfg.optim.name == "adamw":
        defaults = {"optimizer.params.torch_adam": True}  # the pass-through may choose DeepSpeed's kernels instead
    else:
        # DeepSpeed vouches only for Adam-like optimizers under ZeRO. SGD's update is elementwise,
        # so it is exact on ZeRO's flat parameter partitions.
        defaults = {"zero_allow_untested_optimizer": True}
    generated: dict = {}
    for key, value, _ in derived:
        _put(generated, key, value)
    generated = _merged(generated, extra)
    for key, value, _ in derived:  # a key the pass-through repeats keeps salnet's typed value (8, not 8.0)
        _put(generated, key, value)
    # ZeRO-3's "memory-efficient linear" replaces torch.nn.functional.linear, for the whole process and
    # for good, by DeepSpeed's own autograd function, whose backward sums the bias gradient in
    # another order: every network with a Linear layer (Swin, ConvNeXt, ViT, PVT) then drifts from
    # DDP by roundings, and so does any later run in the same process, ZeRO-2 and DDP included.
    # Without it ZeRO-3 treats a Linear as it treats a convolution (re-gathered for the backward).
    defaults["zero_optimization.memory_efficient_linear"] = False
    for key, value in defaults.items():
        if _get(generated, key) is MISSING:
            _put(generated, key, value)
    return generated


def _check_pass_through(extra: dict, derived: list[tuple[str, Any, str]]) -> None:
    problems = []
    if "scheduler" in extra:
        problems.append(
            "deepspeed.scheduler is set, but salnet steps its own lr schedule (optim.schedule, optim.warmup_steps, "
            "optim.min_lr_ratio), exactly as under DDP; remove deepspeed.scheduler"
        )
    for key, value, source in derived:
        given = _get(extra, key)
        if given is not MISSING and not _same(given, value):
            problems.append(
                f"deepspeed.{key}={given!r} contradicts {source} (which sets {key}={value!r}); "
                f"remove deepspeed.{key} or change the salnet setting"
            )
    if problems:
        raise ConfigError("conflicting DeepSpeed settings:\n  " + "\n  ".join(problems))


def _numbers_from_text(tree: Any) -> Any:
    """Numbers YAML 1.1 leaves as text ('1e-3' has no dot) made numbers, as salnet's own keys get them."""
    if isinstance(tree, dict):
        return {k: _numbers_from_text(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_numbers_from_text(v) for v in tree]
    if isinstance(tree, str) and SCIENTIFIC.fullmatch(tree.strip()):
        return float(tree)
    return tree


def _same(given: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(given, bool):
        return given is value
    if isinstance(value, (int, float)):
        return isinstance(given, (int, float)) and float(given) == float(value)
    if isinstance(value, list):
        return isinstance(given, (list, tuple)) and len(given) == len(value) and all(map(_same, given, value))
    return given == value


def _get(tree: dict, dotted: str) -> Any:
    """The value at `dotted`; a non-mapping where a section should be counts as that key's value."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return node
        if part not in node:
            return MISSING
        node = node[part]
    return node


def _put(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = (
            _merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else copy.deepcopy(value)
        )
    return out
