"""Backbone weights: torchvision's pretrained files (through torch.hub's cache) or a local state dict
(a torch.save'd one, or safetensors), for any family (timm's pretrained files: salnet.model.timm_backbone).

Compute nodes often have no network. A pretrained file that is neither cached nor downloadable
stops the run with the exact file, where it belongs and the one command that fetches it: a run
that asked for pretrained weights must never train from scratch silently.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path
from urllib.parse import urlparse

import safetensors.torch
import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model_weights

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
NO_WEIGHTS = "none"
# A firewalled node drops packets instead of refusing them; without a timeout the download
# would wait for the OS's TCP timeout (minutes) before failing.
PROBE_TIMEOUT_S = 10
KEYS_SHOWN = 8


class BackboneWeightsError(RuntimeError):
    """The requested backbone weights cannot be loaded; the message says which file and how to fix it."""


def torchvision_weights(backbone: str, weights: str) -> WeightsEnum | None:
    """The torchvision weights entry that `weights` names for `backbone`, or None if it names none.

    'imagenet' means IMAGENET1K_V1: the file every ResNet has, and the one published SOD models
    (PoolNet, F3Net, MINet, ...) start from, so results stay comparable with theirs. A family
    without a V1 file (vit_h_14: SWAG only) gets torchvision's DEFAULT.
    """
    entries = get_model_weights(backbone)
    if weights == IMAGENET:
        return entries.__members__.get("IMAGENET1K_V1", entries.DEFAULT)
    return entries.__members__.get(weights)


def cache_path(entry: WeightsEnum) -> Path:
    """Where torch.hub keeps `entry`'s file: $TORCH_HOME/hub/checkpoints/<file name in the URL>.

    The same place torchvision itself uses, so a file fetched with torchvision is found here.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(entry.url).path)


def _download(entry: WeightsEnum, dest: Path, backbone: str, weights: str) -> None:
    try:
        # A fresh opener reads the proxy variables now, not when urllib was first used.
        probe = urllib.request.Request(entry.url, method="HEAD", headers={"User-Agent": "salnet"})
        urllib.request.build_opener().open(probe, timeout=PROBE_TIMEOUT_S).close()
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The hash in the file name (resnet50-0676ba61.pth) is a prefix of the file's sha256.
        hash_match = torch.hub.HASH_REGEX.search(dest.name)
        hash_prefix = hash_match.group(1) if hash_match else None
        torch.hub.download_url_to_file(entry.url, str(dest), hash_prefix, progress=sys.stderr.isatty())
    except (OSError, RuntimeError) as e:  # URLError and socket errors are OSErrors; a bad hash is a RuntimeError
        raise BackboneWeightsError(
            f"model.backbone.weights={weights!r}: {backbone}'s torchvision weights {entry} are not cached "
            f"and could not be downloaded ({e}).\n"
            f"  expected file: {dest}\n"
            f"  (torch.hub's cache, $TORCH_HOME/hub/checkpoints; point TORCH_HOME elsewhere to use another)\n"
            f"  fetch it on a machine with network, onto a filesystem this node sees, with:\n"
            f"    curl -fL --create-dirs -o {dest} {entry.url}\n"
            f"  or set model.backbone.weights=none to train from scratch."
        ) from None


def _read_state_dict(path: Path, weights: str) -> dict:
    """The tensors in `path`: a safetensors file (by its suffix), else torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            raise BackboneWeightsError(
                f"model.backbone.weights={weights!r}: cannot read {path} as safetensors: {e}"
            ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (pickle, zip, weights_only refusals)
        raise BackboneWeightsError(
            f"model.backbone.weights={weights!r}: cannot read {path} with torch.load(weights_only=True): {e}"
        ) from e


def _load_state_dict(
    model: nn.Module, path: Path, backbone: str, weights: str, strict: bool, adapt: Callable[[dict], dict] | None
):
    """Read the state dict at `path`, `adapt` it, load it into `model`; returns load_state_dict's result."""
    state = _read_state_dict(path, weights)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(
            f"model.backbone.weights={weights!r}: {path} holds a {type(state).__name__}, not a state dict "
            f"(a mapping of parameter names such as 'layer1.0.conv1.weight' to tensors)"
        )
    if adapt is not None:
        state = adapt(state)
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as e:  # shape mismatches always; missing or unexpected keys when strict
        raise BackboneWeightsError(f"model.backbone.weights={weights!r}: {path} does not fit {backbone}: {e}") from None


def _shown(keys: list[str]) -> str:
    more = f", ... ({len(keys) - KEYS_SHOWN} more)" if len(keys) > KEYS_SHOWN else ""
    return ", ".join(keys[:KEYS_SHOWN]) + more


def load_backbone_weights(
    model: nn.Module,
    backbone: str,
    weights: str,
    needed: Collection[str],
    adapt: Callable[[dict], dict] | None = None,
) -> None:
    """Load `weights` ('imagenet' | a torchvision weights name | 'none' | a path) into torchvision model `backbone`.

    `needed`: the state-dict keys the backbone uses (its classifier's are not needed, so a file
    without them is complete). `adapt` maps a file's state dict to one that fits `model` (ViT
    resizes the position embeddings of another image size).
    """
    if weights == NO_WEIGHTS:
        return
    entry = torchvision_weights(backbone, weights)
    if entry is not None:
        path = cache_path(entry)
        if not path.is_file():
            _download(entry, path, backbone, weights)
        _load_state_dict(model, path, backbone, weights, True, adapt)  # an official file matches exactly
        log.info("backbone %s: loaded torchvision weights %s from %s", backbone, entry, path)
        return

    path = Path(weights).expanduser()
    if not path.is_file():
        names = ", ".join(get_model_weights(backbone).__members__)
        raise BackboneWeightsError(
            f"model.backbone.weights={weights!r} is not a file; valid values: 'imagenet', 'none', "
            f"a torchvision weights name of {backbone} ({names}), or the path to a torchvision-format state dict "
            f"(torch.save'd or .safetensors)"
        )
    load_weights_file(model, path, backbone, weights, needed, adapt)


def load_weights_file(
    model: nn.Module,
    path: Path,
    backbone: str,
    weights: str,
    needed: Collection[str],
    adapt: Callable[[dict], dict] | None = None,
) -> None:
    """Load the state dict at `path` (the file model.backbone.weights=`weights` names) into `model`: every key of
    `needed` must be in it (after `adapt`), so nothing the backbone uses stays randomly initialised; keys the model
    lacks are ignored with a warning (a classifier, say)."""
    result = _load_state_dict(model, path, backbone, weights, False, adapt)
    needed = set(needed)
    missing = [k for k in result.missing_keys if k in needed]
    if missing:
        # Keys that are all there under a prefix ('module.', 'backbone.') show up as unexpected ones.
        unexpected = f"; its unexpected keys: {_shown(result.unexpected_keys)}" if result.unexpected_keys else ""
        raise BackboneWeightsError(
            f"model.backbone.weights={weights!r}: {path} lacks {len(missing)} of {backbone}'s "
            f"tensors, which would stay randomly initialised: {_shown(missing)}{unexpected}"
        )
    if result.unexpected_keys:
        log.warning(
            "backbone %s: ignored %d unexpected keys in %s: %s",
            backbone,
            len(result.unexpected_keys),
            path,
            _shown(result.unexpected_keys),
        )
    log.info("backbone %s: loaded state dict %s", backbone, path)
