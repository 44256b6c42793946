"""What the training recipes of transformer backbones need to know about a backbone's parameters.

Layer ids (for optim.layer_decay), by a rule per family, read off the backbone's own structure and
parameter names (no table of model names). Ids run from 0 (the stem / patch embedding) to `top`:
- ResNet: conv1/bn1 are 0; each residual block (layerK.j: bottleneck or basic block, its
  downsample included) gets the next id, counting through layer1..layer4 (resnet50: 1..16);
- Swin, Swin V2, ConvNeXt: features.0 (patch embedding / stem) is 0; each block of the four stages
  gets the next id; a downsampling layer (patch merging / ConvNeXt's LayerNorm + stride-2 conv) shares
  the id of the block before it (the rule of the Swin/SimMIM and BEiT fine-tuning code);
- ViT: conv_proj, class_token and encoder.pos_embedding are 0; encoder layer i is i + 1;
- timm: the model's own group_matcher (timm's layer-decay rule: the stem 0, then its blocks or stages).
Anything else in the backbone (ViT's final LayerNorm and its new feature-pyramid layers) is `top` =
number of blocks + 1, the backbone's full lr, as the decoder's is the decoder's full lr.

Position parameters (optim.no_decay_extra): torchvision's and timm's names of position embeddings,
class tokens, relative-position tables and layer scales.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from salnet.model.stages import StageBackbone
from salnet.model.timm_backbone import TimmBackbone
from salnet.model.vit_pyramid import ViTPyramid

# optim.no_decay_extra's kinds -> how torchvision and timm name those parameters (the end of the name, or a
# module on its path). Swin V2's relative positions come from a small MLP (cpb_mlp) scaled by logit_scale;
# timm calls position embeddings pos_embed (absolute_pos_embed), class tokens cls_token, layer scales gamma.
NO_DECAY_NAMES = {
    "position": (
        "pos_embedding",
        "pos_embed",
        "absolute_pos_embed",
        "relative_position_bias_table",
        "logit_scale",
        ".cpb_mlp.",
    ),
    "class_token": ("class_token", "cls_token"),
    "layer_scale": ("layer_scale", "gamma"),
}


class LayerIds(NamedTuple):
    ids: dict[str, int]  # parameter name (as backbone.named_parameters() gives it) -> layer id
    top: int  # the largest id: parameters at full (backbone) lr


def _prefixes(backbone: nn.Module) -> tuple[list[tuple[str, int]], int]:
    """[(name prefix, layer id)] and the number of blocks, by the backbone's family."""
    prefixes: list[tuple[str, int]] = []
    blocks = 0
    if isinstance(backbone, StageBackbone):
        for i, module in enumerate(backbone.features):
            if i % 2:  # a stage: a Sequential of blocks
                for j in range(len(module)):
                    blocks += 1
                    prefixes.append((f"features.{i}.{j}.", blocks))
            else:  # the stem (0) or a downsampling layer: the id of the block before it
                prefixes.append((f"features.{i}.", blocks))
    elif isinstance(backbone, ViTPyramid):
        prefixes += [("conv_proj.", 0), ("class_token", 0), ("encoder.pos_embedding", 0)]
        for name, _ in backbone.encoder.layers.named_children():
            blocks += 1
            prefixes.append((f"encoder.layers.{name}.", blocks))
    elif all(hasattr(backbone, f"layer{k}") for k in range(1, 5)):  # ResNet's feature extractor
        prefixes += [("conv1.", 0), ("bn1.", 0)]
        for k in range(1, 5):
            for name, _ in getattr(backbone, f"layer{k}").named_children():
                blocks += 1
                prefixes.append((f"layer{k}.{name}.", blocks))
    else:
        raise TypeError(f"no layer-id rule for a backbone of type {type(backbone).__name__}")
    return prefixes, blocks


def layer_ids(backbone: nn.Module) -> LayerIds:
    """Every backbone parameter's layer id (see the module docstring for the rule per family)."""
    if isinstance(backbone, TimmBackbone):
        if backbone.layer_groups is None:
            raise TypeError("optim.layer_decay: this timm model has no group_matcher, so no layer ids")
        top = max(backbone.layer_groups.values()) + 1
        return LayerIds({n: backbone.layer_groups.get(n, top) for n, _ in backbone.named_parameters()}, top)
    prefixes, blocks = _prefixes(backbone)
    top = blocks + 1
    ids = {}
    for name, _ in backbone.named_parameters():
        ids[name] = next((i for prefix, i in prefixes if name == prefix or name.startswith(prefix)), top)
    return LayerIds(ids, top)


def no_decay_kind(name: str) -> str | None:
    """The optim.no_decay_extra kind of parameter `name` (a full or backbone-relative name), if any."""
    dotted = f".{name}"
    for kind, patterns in NO_DECAY_NAMES.items():
        if any((p in dotted) if p.startswith(".") else dotted.endswith(f".{p}") for p in patterns):
            return kind
    return None
