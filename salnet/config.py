"""The run configuration: one typed schema, YAML files, dotted command-line overrides.

Every entry point (`salnet.train`, `salnet.config`, `launch/submit.py`, ...) parses its arguments
with `add_config_arguments` + `config_from_args`, so they all accept the same

    --config configs/X.yaml  key.sub=value  key.list=[1,2]  key.flag=true

Precedence: schema defaults < YAML file < overrides, applied left to right.

Validation is pydantic's (extra keys forbidden, types checked and coerced); this module only
turns pydantic's errors into one message that names the key, where it came from (file or
command line) and what would be valid, with a "did you mean" for typos.

This module deliberately imports neither torch nor anything heavy: a typo must fail in well
under a second, before any process group or model exists.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from salnet.fsio import atomic_write
from salnet.metrics.names import (
    FAMILIES,
    LOWER_IS_BETTER,
    METRICS,
    MissingPackageError,
    check_packages,
    metric_names,
)

DEFAULT_VAL_SET = "val"  # the name of data.val when it is a plain list
MEAN_OVER_SETS = "mean"  # val/<mean>/<metric>: the mean over named sets
MIN_INPUT_SIZE = 32  # the backbone's output stride: C5 is input / 32


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and where."""


class Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored; inf and nan are never valid settings.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# The schema. One class per section; each later stage reads only its own section.
# --------------------------------------------------------------------------------------------


class AugmentConfig(Section):
    scale: tuple[float, float] = Field(
        (0.75, 1.0),
        description="random scale-crop area range (fraction of the image, 0 < min <= max <= 1); "
        "the crop is then resized to the training size",
    )
    hflip: bool = Field(True, description="random horizontal flip (image and mask together)")
    rotate_deg: float = Field(
        10.0, ge=0, le=180, description="max absolute random rotation in degrees, image and mask together (0 disables)"
    )
    color_jitter: float = Field(
        0.2, ge=0, le=1, description="brightness/contrast/saturation jitter strength, image only (0 disables)"
    )

    def model_post_init(self, context) -> None:
        # See DataConfig.model_post_init.
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.augment.scale must satisfy 0 < min <= max <= 1, got {list(self.scale)}")


class DataConfig(Section):
    train: list[str] = Field(
        ["shards/demo/train"],
        min_length=1,
        description="train shard directories or URLs (local dir, http(s)://HOST/DIR, s3://BUCKET/DIR, or pipe:CMD with {} "
        "where the file name goes); each must hold manifest.json",
    )
    train_weights: list[float] | None = Field(
        None,
        description="mixing weights, one per train set: set i draws round(N * w_i / sum(w)) samples per epoch, N = all train "
        "samples (repeating or subsampling the set); default: every sample once",
    )
    val: list[str] | dict[str, list[str]] = Field(
        ["shards/demo/val"],
        description="validation shard directories or URLs (same forms as data.train): a list is one set named "
        "'val'; named sets ({DUTS-TE: [shards/duts-te], ECSSD: [shards/ecssd]}) are scored separately",
    )
    size: int = Field(352, gt=0, description="training input size in pixels (square)")
    multiscale: list[int] = Field(
        [],
        description="if set, each batch picks its size from this list (F3Net-style; the same size on every rank at a step) instead of data.size",
    )
    eval_size: int = Field(
        352, gt=0, description="validation input size in pixels; metrics are computed at the mask's original size"
    )
    batch_size: int = Field(32, gt=0, description="micro-batch per rank")
    eval_batch_size: int = Field(32, gt=0, description="validation batch per rank")
    workers: int | None = Field(
        None,
        ge=0,
        description="loader worker processes per rank; part of the data order, so set it for runs that must "
        "replay on other machines (default: CPUs per rank - 1, at most 8; 0 reads in the training process)",
    )
    prefetch: int = Field(2, gt=0, description="batches prefetched per worker")
    persistent_workers: bool = Field(True, description="keep loader workers alive across epochs")
    shuffle_buffer: int = Field(
        1000,
        ge=1,
        description="samples each reader holds (as raw bytes) to shuffle the order within its shards (1: tar order)",
    )
    on_error: Literal["error", "skip"] = Field(
        "error",
        description="a corrupt sample (bad image bytes, missing mask) stops the run naming shard and key "
        "(error), or is logged, counted and replaced by another sample of its batch (skip)",
    )
    max_pixels: int = Field(
        64_000_000,
        gt=0,
        description="an image or mask whose header declares more pixels is refused before it is decoded "
        "(data.on_error decides), naming the shard, sample and size (salnet.imagecheck)",
    )
    max_member_bytes: int = Field(
        256 * 2**20,
        gt=0,
        description="a shard member (tar entry) above this many bytes is refused from its header before "
        "it is read, naming shard and member; compressed shards are always refused",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="joint image/mask augmentation")
    augment_on: Literal["worker", "device"] | None = Field(
        None,
        description="where data.augment runs: 'worker' (loader processes warp each sample once and hand over uint8 batches at the training size) "
        "or 'device' (workers only decode and cut the crop box; the training device warps and jitters the whole batch at once); "
        "null: device when training on CUDA, worker otherwise",
    )

    def model_post_init(self, context) -> None:
        # A method, not a pydantic validator decorator: pydantic reports its ValueError as a config error all the same.
        if self.train_weights is not None and len(self.train_weights) != len(self.train):
            raise ValueError(
                f"data.train_weights has {len(self.train_weights)} weights but data.train lists {len(self.train)} sets"
            )
        if self.train_weights is not None and min(self.train_weights) <= 0:
            raise ValueError(f"data.train_weights must all be > 0, got {self.train_weights}")
        if self.multiscale and min(self.multiscale) <= 0:
            raise ValueError(f"data.multiscale sizes must all be > 0, got {self.multiscale}")
        if isinstance(self.val, dict) and not self.val:
            raise ValueError(
                "data.val={} names no validation set: give a list of shard directories or {SET: [dirs], ...}"
            )
        for key, location in self.sources():
            path = _local_path(location)
            if path is not None and path.exists() and not path.is_dir():
                raise ValueError(
                    f"{key}={location!r} is a file; a shard set is a directory holding manifest.json "
                    f"(made by `python -m salnet.shards pack`)"
                )
        for name in self.val_sets:
            if not name or "/" in name or name == MEAN_OVER_SETS:
                raise ValueError(
                    f"data.val set name {name!r} is not valid: use a non-empty name without '/', other than {MEAN_OVER_SETS!r}"
                )

    @property
    def val_sets(self) -> dict[str, list[str]]:
        """The validation sets by name (a plain list is one set named 'val')."""
        return dict(self.val) if isinstance(self.val, dict) else {DEFAULT_VAL_SET: list(self.val)}

    def sources(self) -> list[tuple[str, str]]:
        """(the key that names it, location) of every train and val source."""
        out = [(f"data.train[{i}]", loc) for i, loc in enumerate(self.train)]
        if isinstance(self.val, dict):
            return out + [
                (f"data.val.{name}[{i}]", loc) for name, locs in self.val.items() for i, loc in enumerate(locs)
            ]
        return out + [(f"data.val[{i}]", loc) for i, loc in enumerate(self.val)]


def _local_path(location: str) -> Path | None:
    """The path of a local source (a directory or file:///dir), None for a URL or pipe: command."""
    if location.startswith("file://"):
        return Path(unquote(urlparse(location).path))
    if location.startswith("pipe:") or "://" in location:
        return None
    return Path(location).expanduser()


# The backbones by family: torchvision's model names. Channels and strides are not kept here:
# salnet.model reads them off the model itself (a dry pass on the meta device).
BACKBONE_FAMILIES = {
    "resnet": ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d"),
    "swin": ("swin_t", "swin_s", "swin_b"),
    "swin_v2": ("swin_v2_t", "swin_v2_s", "swin_v2_b"),
    "convnext": ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"),
    "vit": ("vit_b_16", "vit_l_16", "vit_h_14"),
}
# timm backbones: model.backbone.name `timm/<model>`, any timm model with four feature levels at strides 4..32
# (salnet.model.timm_backbone). timm is an optional extra, so its names are checked when the model is built.
TIMM_PREFIX = "timm/"
TIMM_FAMILY = "timm"
TIMM_INSTALL = "pip install 'salnet[timm]'"
# The families whose backbone has BatchNorm: model.norm and model.backbone.frozen_bn reach into
# them; the others have LayerNorm only, so model.norm is the decoder's alone.
BATCHNORM_FAMILIES = ("resnet",)
BACKBONES_COMMAND = "python -m salnet.model --backbones"
# The families with stochastic depth (torchvision's stochastic_depth_prob, timm's drop_path_rate):
# model.backbone.drop_path. torchvision's ViT has none (dropout only), ResNet neither.
DROP_PATH_FAMILIES = ("swin", "swin_v2", "convnext", TIMM_FAMILY)
# The families model.backbone.checkpointing recomputes: not ResNet, whose BatchNorm would update its
# running statistics a second time in the recomputation (a timm model with BatchNorm is refused when built).
CHECKPOINTING_FAMILIES = ("swin", "swin_v2", "convnext", "vit", TIMM_FAMILY)


def backbone_family(name: str) -> str | None:
    """The family of backbone `name` ('resnet', 'swin', ..., 'timm'), or None for an unknown name."""
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return TIMM_FAMILY
    return next((family for family, names in BACKBONE_FAMILIES.items() if name in names), None)


def check_backbone_name(name: str) -> str:
    """The family of backbone `name`; a ValueError that lists the families for an unknown name."""
    family = backbone_family(name)
    if family is None:
        every = [n for names in BACKBONE_FAMILIES.values() for n in names]
        close = difflib.get_close_matches(name, every, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"model.backbone.name={name!r} is not a known backbone{hint} Families: "
            + ", ".join(f"{f} ({names[0]}, ...)" for f, names in BACKBONE_FAMILIES.items())
            + f", timm ({TIMM_PREFIX}<any timm model>, e.g. {TIMM_PREFIX}pvt_v2_b0, with {TIMM_INSTALL})"
            + f"; `{BACKBONES_COMMAND}` lists every name"
        )
    return family


class BackboneConfig(Section):
    name: str = Field(
        "resnet50",
        description="torchvision backbone (torchvision's own code and weight format), of the families "
        + ", ".join(BACKBONE_FAMILIES)
        + f"; `{BACKBONES_COMMAND}` lists every name; or {TIMM_PREFIX}<model>: any timm model with four feature "
        f"levels at strides 4, 8, 16, 32 (timm/pvt_v2_b0, timm/swin_base_patch4_window12_384.ms_in22k, ...; "
        f"{TIMM_INSTALL})",
    )
    weights: str = Field(
        "none",
        description="'imagenet' (torchvision's IMAGENET1K_V1 file, or its DEFAULT where there is no V1 (vit_h_14), cached "
        "in TORCH_HOME), another torchvision weights name of this backbone (e.g. IMAGENET1K_V2), 'none' (random init), "
        "or a path to a state dict in the model's own key names (torch.save'd, or .safetensors). A timm backbone: "
        "'imagenet' is timm's pretrained file of the name's tag (timm/pvt_v2_b0.in1k; timm's default tag without "
        "one), from the local Hugging Face cache only (HF_HOME / HF_HUB_CACHE)",
    )
    frozen_bn: bool = Field(
        False,
        description="replace the backbone's BatchNorm by FrozenBatchNorm2d: statistics and affine parameters stay as "
        "loaded (torchvision's ResNet family only: the others have no BatchNorm; timm backbones keep theirs as built)",
    )
    drop_path: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="stochastic depth rate at the last block, rising linearly from 0 at the first (torchvision's rule "
        "for stochastic_depth_prob), of the families "
        + ", ".join(DROP_PATH_FAMILIES)
        + "; null: torchvision's default for the model "
        "(swin_t 0.2, convnext_tiny 0.1, ...); ResNet and torchvision's ViT have no drop path; a timm backbone gets "
        "it as timm's drop_path_rate (null: timm's default, mostly 0)",
    )
    checkpointing: bool = Field(
        False,
        description="activation checkpointing of each backbone block in training (every Swin / ConvNeXt block, every "
        "ViT encoder layer; a timm model's set_grad_checkpointing, unless it has BatchNorm): activations are recomputed "
        "in the backward pass, so large models fit at large sizes, for one more forward pass; the same loss and "
        "gradients. Families " + ", ".join(CHECKPOINTING_FAMILIES),
    )

    def model_post_init(self, context) -> None:
        family = check_backbone_name(self.name)
        if self.frozen_bn and family not in BATCHNORM_FAMILIES:
            raise ValueError(
                f"model.backbone.frozen_bn=true freezes a backbone's BatchNorm, and {self.name} ({family} family) "
                + ("keeps its norm layers as timm builds them" if family == TIMM_FAMILY else "has LayerNorm only")
                + "; set model.backbone.frozen_bn=false"
            )
        if self.drop_path is not None and family not in DROP_PATH_FAMILIES:
            why = "torchvision's ViT has no stochastic depth" if family == "vit" else "ResNet has no stochastic depth"
            raise ValueError(
                f"model.backbone.drop_path={self.drop_path} is for the families {', '.join(DROP_PATH_FAMILIES)}; "
                f"{self.name} is {family} ({why}): set model.backbone.drop_path=null"
            )
        if self.checkpointing and family not in CHECKPOINTING_FAMILIES:
            raise ValueError(
                f"model.backbone.checkpointing=true is for the families {', '.join(CHECKPOINTING_FAMILIES)}; {self.name} "
                f"is {family}, whose BatchNorm would update its running statistics again when a block is recomputed: "
                f"set model.backbone.checkpointing=false"
            )


class ModelConfig(Section):
    factory: str | None = Field(
        None,
        description="your own network: 'package.module:function', called with this model section, returning a "
        "torch.nn.Module with salnet's contract (see salnet/model/factory.py); null: salnet's FPN + PPM",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="model.factory's own settings, free-form (its function reads them)"
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="feature extractor C2..C5")
    ppm_bins: list[int] = Field(
        [1, 2, 3, 6], min_length=1, description="pyramid pooling output sizes on C5 (each >= 1)"
    )
    ppm_branch_width: int | None = Field(
        None, gt=0, description="channels of each PPM pooling branch (default: C5 channels // 4, as in PSPNet)"
    )
    ppm_width: int = Field(256, gt=0, description="PPM output channels (the top of the FPN)")
    fpn_width: int = Field(256, gt=0, description="common channel width of the FPN levels and the fusion head")
    fuse: Literal["concat", "sum"] = Field(
        "concat", description="how P2..P5 (resized to P2) are fused before a 1x1 conv-norm-ReLU and the 1x1 logit conv"
    )
    norm: Literal["batch", "group"] = Field(
        "batch",
        description="norm layer of the decoder, and of a ResNet backbone unless backbone.frozen_bn "
        "(group with pretrained weights needs backbone.frozen_bn=true); Swin, ConvNeXt and ViT keep their LayerNorm",
    )
    gn_groups: int = Field(32, gt=0, description="groups for GroupNorm (must divide every normalised channel count)")

    def model_post_init(self, context) -> None:
        # Checks that need no architecture facts live here, so they fail before torch is imported;
        # salnet.model checks the GroupNorm channel counts, which depend on the backbone.
        if any(b < 1 for b in self.ppm_bins):
            raise ValueError(f"model.ppm_bins must all be >= 1 (output sizes of the pooling), got {self.ppm_bins}")
        module, sep, function = (self.factory or "").partition(":")
        if self.factory is not None and not (sep and module and function.isidentifier()):
            raise ValueError(
                f"model.factory={self.factory!r} must name a function as 'package.module:function', "
                f"e.g. my_sod.decoder:build"
            )
        if self.options and self.factory is None:
            raise ValueError(
                f"model.options ({', '.join(self.options)}) are the settings of a model.factory network; "
                f"salnet's FPN + PPM (model.factory=null) takes none"
            )
        # The widths this section sets; salnet.model checks the ones the backbone decides (C5 // 4 by default).
        widths = {"model.ppm_width": self.ppm_width, "model.fpn_width": self.fpn_width}
        if self.ppm_branch_width is not None:
            widths["model.ppm_branch_width"] = self.ppm_branch_width
        wrong = {key: c for key, c in widths.items() if c % self.gn_groups}
        if self.norm == "group" and self.factory is None and wrong:
            raise ValueError(
                f"model.gn_groups={self.gn_groups} must divide the channels of every GroupNorm layer; it does not divide "
                + ", ".join(f"{key}={c}" for key, c in wrong.items())
            )
        if (
            self.norm == "group"
            and backbone_family(self.backbone.name) in BATCHNORM_FAMILIES
            and not self.backbone.frozen_bn
            and self.backbone.weights != "none"
        ):
            raise ValueError(
                f"model.norm=group puts GroupNorm into the backbone, which cannot take the BatchNorm statistics of "
                f"model.backbone.weights={self.backbone.weights!r}; set model.backbone.frozen_bn=true (frozen pretrained "
                f"BatchNorm, GroupNorm decoder: the usual small-batch recipe) or model.backbone.weights=none"
            )


class LossConfig(Section):
    kind: Literal["bce_iou", "structure", "dice"] = Field(
        "bce_iou",
        description="pixel loss on every output: BCE + soft IoU, F3Net's boundary-weighted structure loss, or BCE + Dice",
    )
    side_weights: list[float] = Field(
        [0.5, 0.25, 0.125, 0.0625],
        description="deep-supervision weights (each >= 0), one per side output the network returns in training: "
        "salnet's P2..P5, or model.factory's own ([] for none); the fused output has 1.0",
    )

    def model_post_init(self, context) -> None:
        if any(w < 0 for w in self.side_weights):
            raise ValueError(f"loss.side_weights must all be >= 0, got {self.side_weights}")


class OptimConfig(Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="optimizer (sgd uses Nesterov momentum)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of the decoder")
    backbone_lr_mult: float = Field(0.1, ge=0, description="backbone lr = lr x this (0.1 is the SOD convention)")
    weight_decay: float = Field(
        1e-4, ge=0, description="weight decay (never on parameters of fewer than 2 dims: norm weights and biases)"
    )
    no_decay_extra: list[Literal["position", "class_token", "layer_scale"]] = Field(
        [],
        description="more parameters without weight decay: position = ViT's encoder.pos_embedding, Swin's "
        "relative_position_bias_table, Swin V2's cpb_mlp and logit_scale, timm's pos_embed; class_token = ViT's (timm's "
        "cls_token); layer_scale = ConvNeXt's (1-D in the reference code, so undecayed there; timm's gamma)",
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise lr decay: a backbone parameter of layer id i gets its lr x this^(top - i) (stem / patch "
        "embedding 0, one id per block, top: the rest of the backbone; see salnet/model/layers.py); the decoder keeps "
        "the full lr; null or 1: off",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum / AdamW beta1")
    beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    schedule: Literal["cosine", "poly", "constant"] = Field(
        "cosine", description="decay after warm-up, stepped per optimizer step"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of the peak")
    poly_power: float = Field(0.9, gt=0, description="exponent of the poly schedule")
    grad_clip: float | None = Field(
        None, gt=0, description="clip the global grad norm (unscaled) to this; null disables"
    )


class TrainConfig(Section):
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="distributed strategy")
    steps: int | None = Field(None, gt=0, description="total optimizer steps (exclusive with epochs)")
    epochs: int | None = Field(None, gt=0, description="total epochs (exclusive with steps)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    amp: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="precision: fp32, bf16 autocast, or fp16 autocast with a gradient scaler"
    )
    channels_last: bool = Field(True, description="NHWC memory format for the model and inputs")
    compile: bool = Field(False, description="torch.compile the model")
    sync_bn: bool = Field(False, description="convert BatchNorm to SyncBatchNorm (CUDA only; DDP and DeepSpeed)")
    bucket_mb: int = Field(
        25,
        gt=0,
        description="gradient communication bucket in MiB: DDP's bucket_cap_mb; under DeepSpeed, "
        "ZeRO's reduce and all-gather buckets (as float32 elements)",
    )
    static_graph: bool = Field(
        False,
        description="DDP static_graph optimisation; it lets DDP regroup its gradient buckets after each attempt's "
        "first step, so with 3 or more ranks a resumed run equals an uninterrupted one only to float rounding "
        "(off: the buckets stay fixed and resume is bitwise)",
    )
    zero_stage: Literal[1, 2, 3] = Field(
        2,
        description="DeepSpeed ZeRO stage (train.strategy=deepspeed): 1 partitions the optimizer states across ranks, "
        "2 also the gradients, 3 also the parameters (gathered layer by layer in forward and backward)",
    )
    offload_optimizer: bool = Field(
        False,
        description="DeepSpeed: keep the optimizer states in CPU memory and run the optimizer step there (ZeRO-Offload); "
        "frees GPU memory at the cost of host transfers and CPU time",
    )
    offload_params: bool = Field(
        False,
        description="DeepSpeed ZeRO-3: keep the parameter partitions in CPU memory between uses (needs train.zero_stage=3)",
    )
    seed: int = Field(0, description="global seed; each rank derives its own")
    timeout_s: int = Field(
        1800, gt=0, description="collective timeout in seconds (a dead rank fails the job after this)"
    )
    max_bad_steps: int = Field(5, gt=0, description="consecutive non-finite steps before training stops")
    resume: str = Field(
        "auto",
        description="'auto' (newest complete checkpoint of the run), 'none' (start over: removes the run's checkpoints and best.pt), or a checkpoint path",
    )

    def model_post_init(self, context) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError(
                f"train.steps={self.steps} and train.epochs={self.epochs} are both set; the budget is one of them: "
                f"set the other to null"
            )
        if self.strategy != "deepspeed" and (self.offload_optimizer or self.offload_params):
            raise ValueError(
                f"train.offload_optimizer / train.offload_params are DeepSpeed options; they need train.strategy=deepspeed "
                f"(got train.strategy={self.strategy!r})"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"train.offload_params=true needs train.zero_stage=3 (only ZeRO-3 partitions the parameters), got train.zero_stage={self.zero_stage}"
            )


class EvalConfig(Section):
    every: int = Field(500, gt=0, description="validate every N optimizer steps (and at the end)")
    best_metric: str = Field(
        "maxF",
        description="what decides best.pt: METRIC (its mean over the data.val sets) or SET/METRIC (one set's); "
        "METRIC one of "
        + ", ".join(METRICS)
        + " (lower is better for "
        + ", ".join(m for m in METRICS if m in LOWER_IS_BETTER)
        + "; higher for the others)",
    )
    metrics: list[Literal[FAMILIES]] = Field(
        ["F", "E", "S", "MAE"],
        min_length=1,
        description="metric families computed during validation (wF, SI-MAE, SI-F and HCE run on the CPU, "
        "wF and HCE are slow; HCE needs scikit-image)",
    )

    @property
    def best_set_and_metric(self) -> tuple[str | None, str]:
        """(set name, or None for the mean over sets; metric name) of best_metric."""
        set_name, _, metric = self.best_metric.rpartition("/")
        return set_name or None, metric

    def model_post_init(self, context) -> None:
        # Checked here, not at the first validation hundreds of steps into the run.
        try:
            check_packages(self.metrics)
        except MissingPackageError as e:
            raise ValueError(f"eval.metrics={self.metrics}: {e}") from None
        _, metric = self.best_set_and_metric
        computed = metric_names(self.metrics)
        if metric not in METRICS:
            raise ValueError(
                f"eval.best_metric={self.best_metric!r}: {metric!r} is not a metric; valid: {', '.join(METRICS)} "
                f"(or SET/METRIC for one of the data.val sets)"
            )
        if metric not in computed:
            raise ValueError(
                f"eval.best_metric={self.best_metric!r} is not computed by eval.metrics={self.metrics} "
                f"(they compute {', '.join(computed)}); add its family to eval.metrics or pick one of those"
            )


class LogConfig(Section):
    every: int = Field(20, gt=0, description="console/metrics.jsonl line every N optimizer steps")
    wandb: bool = Field(False, description="log to Weights & Biases (rank 0)")
    project: str = Field("salnet", description="W&B project")
    entity: str | None = Field(None, description="W&B entity (team or user)")
    group: str | None = Field(
        None,
        description="W&B group of the run (default: its name); launch/submit.py --sweep sets the sweep's name, "
        "so W&B's grouped and parallel-coordinates views compare the cells",
    )
    wandb_id: str | None = Field(
        None,
        description="W&B run id to create or continue (default: a new one, kept in the checkpoints; "
        "a launcher presets it so every attempt of a job logs to one run)",
    )
    wandb_timeout_s: float = Field(
        60.0,
        gt=0,
        description="longest wait for W&B to start a run or to finish uploading one; past it, training "
        "goes on (or ends) without W&B and metrics.jsonl keeps the record",
    )
    artifacts: bool = Field(
        False,
        description="log best.pt to W&B as a versioned model artifact (aliases best, latest) whenever it improves",
    )
    panel_images: int = Field(
        8,
        ge=0,
        description="val images per set shown at every validation with ground truth and prediction "
        "(the same ones each time; W&B and runs/NAME/plots/); 0: none",
    )
    worst_images: int = Field(
        8, ge=0, description="per set, the K val images with the highest MAE, with their metrics and pictures; 0: none"
    )
    plots: bool = Field(
        True,
        description="rank 0 writes runs/NAME/plots/ (curves, metrics over steps, prediction panels) at every validation",
    )


class CheckpointConfig(Section):
    every: int = Field(500, gt=0, description="save the full training state every N optimizer steps (and at the end)")
    keep: int = Field(3, gt=0, description="newest K complete checkpoints kept")


class Config(Section):
    name: str = Field("run", description="run name; outputs go to <out_dir>/<name>/")
    out_dir: str = Field("runs", description="parent directory of run directories")
    data: DataConfig = Field(default_factory=DataConfig, description="datasets and loader")
    model: ModelConfig = Field(default_factory=ModelConfig, description="network")
    loss: LossConfig = Field(default_factory=LossConfig, description="loss")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop and strategy")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="validation")
    log: LogConfig = Field(default_factory=LogConfig, description="logging")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpointing")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="extra DeepSpeed config keys (train.strategy=deepspeed), merged into the JSON salnet generates, "
        "e.g. deepspeed.zero_optimization.overlap_comm=true; a key salnet derives from its own settings "
        "(batch sizes, precision, optimizer, clipping, ZeRO stage, offload, bucket sizes) must agree with them",
    )

    def model_post_init(self, context) -> None:
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ValueError(
                f"name={self.name!r} must be a plain directory name (no '/', not '.' or '..'): the run directory is "
                f"<out_dir>/<name>, and nothing may be written outside out_dir"
            )
        sizes = {
            "data.size": [self.data.size],
            "data.eval_size": [self.data.eval_size],
            "data.multiscale": self.data.multiscale,
        }
        for key, values in sizes.items():
            if any(v < MIN_INPUT_SIZE for v in values):
                raise ValueError(
                    f"{key}={values if key == 'data.multiscale' else values[0]} is below the network's minimum input size "
                    f"{MIN_INPUT_SIZE} (its output stride: C5 must keep at least one pixel)"
                )
        for (
            name,
            sources,
        ) in self.data.val_sets.items():  # (a DataConfig alone may have no val data: the loader's tests)
            if not sources:
                raise ValueError(f"data.val set {name!r} lists no shard directories: validation needs data")
        best_set, _ = self.eval.best_set_and_metric
        if best_set is not None and best_set not in self.data.val_sets:
            raise ValueError(
                f"eval.best_metric={self.eval.best_metric!r} names the val set {best_set!r}, but data.val has "
                f"{', '.join(repr(n) for n in self.data.val_sets)}; use one of those, or METRIC alone for the mean over sets"
            )
        if self.deepspeed and self.train.strategy != "deepspeed":
            raise ValueError(
                f"the deepspeed: section ({', '.join(self.deepspeed)}) applies only to train.strategy=deepspeed, "
                f"got train.strategy={self.train.strategy!r}"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step over all ranks: ranks x micro-batch x accumulation."""
        return world_size * self.data.batch_size * self.train.grad_accum


# --------------------------------------------------------------------------------------------
# Resuming with a changed config: what may change, and what would make it another run.
# --------------------------------------------------------------------------------------------

# A checkpoint's weights, optimizer state and data position belong to these settings: changing one
# mid-run makes a different experiment (or cannot load at all). Everything else may change on resume.
FIXED_ON_RESUME = (
    "model.",
    "data.train",
    "data.train_weights",
    "data.size",
    "data.multiscale",
    "data.batch_size",
    "data.augment.",
    "train.grad_accum",
    "train.strategy",
    "train.zero_stage",
    "train.offload_optimizer",
    "train.offload_params",
    "train.seed",
    "optim.name",
    "optim.layer_decay",  # the parameter groups of the optimizer state
    "optim.no_decay_extra",
)
IGNORED_ON_RESUME = ("train.resume",)  # how this attempt starts, not what the run is


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and prefix not in ("data.val.", "deepspeed."):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def resume_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(changes that take effect, changes that would break the run), as 'key: old -> new' lines,
    between the config a checkpoint was saved with and the one resuming it."""
    old, new = _flatten(saved), _flatten(cfg.model_dump(mode="json"))
    allowed, breaking = [], []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key) or key in IGNORED_ON_RESUME:
            continue
        line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        fixed = any(key == f or key.startswith(f) for f in FIXED_ON_RESUME)
        (breaking if fixed else allowed).append(line)
    return allowed, breaking


# --------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> validated Config, with errors that point at the source.
# --------------------------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of sections (data:, model:, ...), got {type(data).__name__}"
        )
    return data


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. optim.lr=3e-4)")
    try:
        # YAML gives typed values: 3, 3e-4 (as text; pydantic parses it), true, [1, 2], null.
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text and let the schema judge it
    return key.split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{text}': '{'.'.join(path[: i + 1])}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the key at `loc` (a pydantic error location), if any."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{origin.__name__}[{args}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _format_error(err: dict, source_of) -> str:
    loc = tuple(p for p in err["loc"])
    if not loc:  # a check across sections (Config.model_post_init): its message names the keys itself
        return err["msg"].removeprefix("Value error, ")
    key = ".".join(str(p) for p in loc)
    source = source_of(loc)
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):
        # A check across the keys of one section (its model_post_init): the message names them.
        return f"{err['msg'].removeprefix('Value error, ')} ({source})"
    section = _section_at(loc)
    if err["type"] == "extra_forbidden" and section is not None:
        valid = list(section.model_fields)
        prefix = ".".join(str(p) for p in loc[:-1])
        full = [f"{prefix}.{v}" if prefix else v for v in valid]
        close = difflib.get_close_matches(key, full, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{key}' ({source}){hint} Valid keys{' in ' + repr(prefix) if prefix else ''}: {', '.join(valid)}"
    expected = ""
    if section is not None and isinstance(loc[-1], str) and loc[-1] in section.model_fields:
        expected = f"; expected {_type_name(section.model_fields[loc[-1]].annotation)}"
    return f"key '{key}' ({source}) has invalid value {err.get('input')!r}: {err['msg']}{expected}"


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file at `path` < `overrides` ("a.b=value"). Raises ConfigError."""
    overrides = list(overrides or [])
    tree = _read_yaml(path) if path else {}
    from_cli: dict[tuple, str] = {}
    for text in overrides:
        keys, value = _parse_override(text)
        _set_dotted(tree, keys, value, text)
        from_cli[tuple(keys)] = text

    def source_of(loc: tuple) -> str:
        # The longest override that is a prefix of the failing key is where it came from.
        for n in range(len(loc), 0, -1):
            if tuple(loc[:n]) in from_cli:
                return f"from the command line: '{from_cli[tuple(loc[:n])]}'"
        # A section-wide check: the overrides inside that section are what the user just changed.
        inside = [text for keys, text in from_cli.items() if keys[: len(loc)] == tuple(loc)]
        if inside:
            return "with " + ", ".join(f"'{text}'" for text in inside) + " from the command line"
        return f"from {path}" if path else "from defaults"

    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = [_format_error(err, source_of) for err in e.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


# --------------------------------------------------------------------------------------------
# The config against the machine it runs on: what no schema can know, checked before any work.
# --------------------------------------------------------------------------------------------

SYNC_BN_NEEDS_CUDA = (
    "train.sync_bn=true needs CUDA: torch's SyncBatchNorm is GPU-only; "
    "on CPU use train.sync_bn=false, or model.norm=group for small per-rank batches"
)


def cuda_may_be_present(environ=os.environ) -> bool:
    """False when this machine certainly has no GPU torch could use (no NVIDIA, ROCm or WSL device node,
    or CUDA_VISIBLE_DEVICES hides them all): told without importing torch (seconds). True is not a
    promise; the strategy checks the device it really gets."""
    if environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists() or Path("/dev/dxg").exists()


def check_out_dir(cfg: Config) -> None:
    """ConfigError unless the run directory <out_dir>/<name> can be created and written here.

    Tried, not guessed from permission bits (root ignores them; /proc and read-only mounts refuse
    whatever the bits say): a temporary directory is made and removed in the deepest part of the
    path that exists. Nothing else is created."""
    target = cfg.run_dir
    existing = target
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"out_dir={cfg.out_dir!r}: the run directory {target} cannot be made, '{existing}' is not a directory"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".salnet-write-test-", dir=existing))
    except OSError as e:
        raise ConfigError(
            f"out_dir={cfg.out_dir!r}: the run directory {target} cannot be made, '{existing}' is not writable "
            f"({e.strerror}); choose another out_dir"
        ) from None


def check_runnable(cfg: Config, cuda: bool) -> None:
    """ConfigError for what the config asks of the machine that it lacks: CUDA for train.sync_bn, a
    writable out_dir. `cuda`: whether the job will have GPUs (the launcher knows; salnet.train asks
    cuda_may_be_present)."""
    if cfg.train.sync_bn and not cuda:
        raise ConfigError(SYNC_BN_NEEDS_CUDA)
    check_out_dir(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, path: os.PathLike | str) -> Path:
    """Write the resolved config atomically (temp file + rename): a reader never sees half of it."""
    with atomic_write(path) as f:
        f.write(to_yaml(cfg))
    return Path(path)


# --------------------------------------------------------------------------------------------
# The command line shared by every entry point.
# --------------------------------------------------------------------------------------------


def describe_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf key of the schema."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_keys(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append(
            (
                key,
                _type_name(ann),
                yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...").strip(),
                field.description or "",
            )
        )
    return rows


def keys_help() -> str:
    rows = describe_keys()
    width = max(len(k) for k, *_ in rows)
    lines = ["configuration keys (override any of them as key=value):"]
    for key, type_name, default, desc in rows:
        lines.append(f"  {key:<{width}}  {desc}")
        lines.append(f"  {'':<{width}}    [{type_name}; default: {default}]")
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", metavar="FILE", help="YAML config (see configs/); keys not set keep their defaults")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted overrides applied after the file, e.g. optim.lr=3e-4 train.amp=bf16 model.ppm_bins=[1,2,3,6]",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ((parser.epilog + "\n\n") if parser.epilog else "") + keys_help()
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def parse_config(
    argv: list[str] | None = None,
    prog: str | None = None,
    description: str = "",
    check: typing.Callable[[Config], None] | None = None,
) -> Config:
    """Parse the shared command line (and run `check` on the config); on a config error print it and
    exit with status 2."""
    parser = add_config_arguments(argparse.ArgumentParser(prog=prog, description=description))
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if check is not None:
            check(cfg)
        return cfg
    except ConfigError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        argv,
        prog="python -m salnet.config",
        description="Print the resolved configuration (defaults < --config file < overrides) as YAML.",
    )
    sys.stdout.write(to_yaml(cfg))


if __name__ == "__main__":
    main()
