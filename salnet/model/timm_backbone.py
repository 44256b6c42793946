"""timm backbones: model.backbone.name `timm/<model>` builds any timm model with four feature levels at
strides 4, 8, 16, 32 (PVTv2, Res2Net, Swin, EfficientNet, ConvNeXt, ...), as C2..C5.

timm is an optional extra (`pip install 'salnet[timm]'`): it is imported here, when a timm backbone is
built, so salnet imports and trains its torchvision backbones without it.

The seam: timm's `features_only` model with out_indices picked from the model's own feature_info (the
last level at each of the reductions 4, 8, 16, 32), so the decoder gets the same four levels whatever
the model. Channels-last levels (timm's Swin) become (N, C, H, W) here, once; the image is padded to a
multiple of 32 and each level cropped back to the part the image covers, as for torchvision's Swin.

Weights never come from the network at run time:
- 'imagenet': timm's pretrained file of the model's tag (`pvt_v2_b0.in1k`; a name without a tag gets
  timm's default tag) from the local Hugging Face cache (HF_HOME / HF_HUB_CACHE), or from torch.hub's
  cache for the few files timm has only as a URL; timm itself loads it (its own key remapping). A file
  not there stops the run with its exact repository and name and the command that fetches it.
- a PATH (safetensors or a state dict) in the full timm model's key names (`timm.create_model(name)`,
  classifier included or not): renamed to the features model's keys here, every backbone tensor required.

Layer ids for optim.layer_decay come from the model's own group_matcher (timm's layer-decay rule),
computed on the full model and carried over to the features model's parameter names.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import torch
from torch import nn

from salnet.config import TIMM_PREFIX, ConfigError
from salnet.model.stages import STRIDES, crop_to_input, pad_to_multiple
from salnet.model.weights import IMAGENET, NO_WEIGHTS, BackboneWeightsError, load_weights_file

# The files of a timm repository on the Hugging Face hub that timm loads, in its order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def import_timm() -> ModuleType:
    try:
        import timm
    except ImportError as e:
        raise ConfigError(
            f"model.backbone.name={TIMM_PREFIX}...: timm backbones need the timm package, an optional extra of "
            f"salnet: pip install 'salnet[timm]' (or, in a checkout, pip install -e '.[timm]') ({e})"
        ) from None
    return timm


def timm_model_name(name: str) -> str:
    """The timm model name of backbone `name` ('timm/pvt_v2_b0' -> 'pvt_v2_b0'), checked against timm's registry."""
    timm = import_timm()
    model = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(model):
        close = difflib.get_close_matches(model.split(".")[0], timm.list_models(), n=3, cutoff=0.7)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ConfigError(
            f"model.backbone.name={name!r}: timm {timm.__version__} has no model {model!r}{hint} "
            f'(python -c "import timm; print(timm.list_models(pretrained=True))" lists them)'
        )
    return model


class TimmBackbone(nn.Module):
    """A timm features_only model -> {'c2', 'c3', 'c4', 'c5'} (N, C, H, W), strides 4..32 at any input size.

    `layer_groups`: parameter name (as this module's named_parameters() gives it) -> timm's layer id,
    or None where the model has no group_matcher.
    """

    def __init__(self, features: nn.Module, channels_last: bool, layer_groups: dict[str, int] | None):
        super().__init__()
        self.features = features
        self.channels_last = channels_last
        self.layer_groups = layer_groups

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        levels = self.features(pad_to_multiple(x))
        if self.channels_last:
            levels = [f.permute(0, 3, 1, 2) for f in levels]
        return crop_to_input(levels, height, width)


def _feature_levels(name: str, full: nn.Module) -> tuple[int, ...]:
    """The out_indices of the last feature level at each of the strides 4, 8, 16, 32 of timm model `full`."""
    info = getattr(full, "feature_info", None)
    if not info:
        raise ConfigError(f"model.backbone.name={name!r}: timm's model has no feature_info (no features_only mode)")
    reductions = [level["reduction"] for level in info]
    picked = [max((i for i, r in enumerate(reductions) if r == s), default=None) for s in STRIDES]
    if None in picked:
        raise ConfigError(
            f"model.backbone.name={name!r}: its feature levels are at strides {reductions}; salnet's decoder needs "
            f"one at each of {list(STRIDES)} (a single-stride model such as a plain ViT does not fit; a torchvision "
            f"ViT gets a feature pyramid: model.backbone.name=vit_b_16)"
        )
    return tuple(picked)


def _key_map(full_keys: set[str], feature_keys: set[str]) -> dict[str, str]:
    """Full model key -> features model key. timm's feature wrappers keep the modules under their names,
    flattening a top-level Sequential ('stages.0.x' -> 'stages_0.x') or holding the model as 'model'."""
    mapping = {}
    for key in full_keys:
        found = next((c for c in (key, f"model.{key}", key.replace(".", "_", 1)) if c in feature_keys), None)
        if found is not None:
            mapping[key] = found
    return mapping


def _layer_groups(timm: ModuleType, full: nn.Module, mapping: dict[str, str]) -> dict[str, int] | None:
    """timm's layer id of each features-model parameter ('features.' + its name), from full's group_matcher."""
    if not hasattr(full, "group_matcher"):
        return None
    ids = timm.models.group_parameters(full, full.group_matcher(coarse=False), reverse=True)
    return {f"features.{mapping[k]}": i for k, i in ids.items() if k in mapping}


def _full_model(timm: ModuleType, model: str, drop_path: float | None) -> tuple[nn.Module, dict]:
    """The full timm model on the meta device (its feature levels, key names, layer groups), and the create_model
    arguments that built it. A model that takes any input size only when asked (timm's Swin, ViT-style models:
    dynamic_img_size) is asked, so the decoder's any-size contract holds; at its own size it computes the same."""
    kwargs = {} if drop_path is None else {"drop_path_rate": drop_path}
    try:
        with torch.device("meta"):
            try:
                dynamic = {**kwargs, "dynamic_img_size": True}
                return timm.create_model(model, **dynamic), dynamic
            except TypeError as e:  # the model's constructor does not take that argument
                if "dynamic_img_size" not in str(e):
                    raise
                return timm.create_model(model, **kwargs), kwargs
    except TypeError as e:
        if "drop_path_rate" not in str(e):
            raise
        raise ConfigError(
            f"model.backbone.drop_path={drop_path}: timm's {model} takes no drop_path_rate; set "
            f"model.backbone.drop_path=null"
        ) from None


def _pretrained_file(timm: ModuleType, name: str, model: str) -> Path:
    """The local file of timm's pretrained weights of `model` (with its tag); a BackboneWeightsError that names
    the file and the command that fetches it where the file is not cached."""
    import huggingface_hub

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise BackboneWeightsError(
            f"model.backbone.weights='imagenet': timm has no pretrained file for {model}; name a tag that has one "
            f'(python -c "import timm; print(timm.list_models({model.split(".")[0]!r}, pretrained=True))"), '
            f"a file (model.backbone.weights=PATH) or model.backbone.weights=none"
        )
    reason = "salnet never downloads at run time: compute nodes often have no network"
    if cfg.hf_hub_id:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        for file in files:
            found = huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, file, cache_dir=cache)
            if isinstance(found, str):
                return Path(found)
        raise BackboneWeightsError(
            f"model.backbone.weights='imagenet': {name}'s pretrained file {cfg.hf_hub_id}/{files[0]} is not in the "
            f"local Hugging Face cache ({reason}).\n"
            f"  cache: {cache} (HF_HUB_CACHE, or HF_HOME/hub; point them elsewhere to use another)\n"
            f"  fetch it on a machine with network, into a cache this node sees, with:\n"
            f"    hf download {cfg.hf_hub_id} {files[0]} --cache-dir {cache}\n"
            f"  or set model.backbone.weights=none to train from scratch."
        )
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
    if path.is_file():
        return path
    raise BackboneWeightsError(
        f"model.backbone.weights='imagenet': {name}'s pretrained file is not cached ({reason}).\n"
        f"  expected file: {path}\n"
        f"  (torch.hub's cache, $TORCH_HOME/hub/checkpoints; point TORCH_HOME elsewhere to use another)\n"
        f"  fetch it on a machine with network, onto a filesystem this node sees, with:\n"
        f"    curl -fL --create-dirs -o {path} {cfg.url}\n"
        f"  or set model.backbone.weights=none to train from scratch."
    )


def build_timm_backbone(name: str, weights: str, drop_path: float | None, checkpointing: bool) -> TimmBackbone:
    """The backbone `timm/<model>`, with `weights` ('imagenet' | 'none' | a path) loaded.

    `drop_path`: timm's drop_path_rate (None: the model's default). `checkpointing`: timm's
    set_grad_checkpointing (not for a model with BatchNorm: it would update its statistics twice).
    """
    timm = import_timm()
    model = timm_model_name(name)
    path = None
    if weights not in (IMAGENET, NO_WEIGHTS):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(
                f"model.backbone.weights={weights!r} is not a file; valid values for {name}: 'imagenet' (timm's "
                f"pretrained file of the model's tag, from the local cache), 'none', or the path to a state dict of "
                f"timm's {model} (torch.save'd or .safetensors)"
            )
    full, kwargs = _full_model(timm, model, drop_path)
    levels = _feature_levels(name, full)
    pretrained = {}
    if weights == IMAGENET:
        pretrained = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(_pretrained_file(timm, name, model))}}
    features = timm.create_model(model, features_only=True, out_indices=levels, **kwargs, **pretrained)
    if checkpointing:
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in features.modules()):
            raise ConfigError(
                f"model.backbone.checkpointing=true: {name} has BatchNorm, which would update its running statistics "
                f"again when a block is recomputed: set model.backbone.checkpointing=false"
            )
        # timm's feature wrappers checkpoint their stages; the getter wrapper leaves it to the model it holds
        target = features if hasattr(features, "set_grad_checkpointing") else features.model
        target.set_grad_checkpointing(True)
    full_keys = set(full.state_dict())
    mapping = _key_map(full_keys, set(features.state_dict()))
    channels_last = getattr(features, "output_fmt", None) == timm.layers.Format.NHWC
    backbone = TimmBackbone(features, channels_last, _layer_groups(timm, full, mapping))
    if path is not None:

        def adapt(state: dict) -> dict:
            # The full model's keys the features model lacks (classifier, final norm) are dropped; a key the full
            # model does not know stays as it is, so a prefixed file shows its keys in the error.
            return {mapping.get(k, k): v for k, v in state.items() if k in mapping or k not in full_keys}

        load_weights_file(features, path, name, weights, set(features.state_dict()), adapt)
    return backbone
