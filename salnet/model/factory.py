"""A researcher's own network on salnet's machinery: `model.factory: my_package.my_module:build`.

The function named is called with the model section (ModelConfig; `model.options` is a free-form
mapping for the network's own settings) and returns a torch.nn.Module with salnet's contract:

- eval mode: image batch [B, 3, H, W] (ImageNet-normalised) -> logits [B, 1, H, W] at the input size,
  a plain tensor;
- training mode: the same tensor, or a list/tuple [fused, side_1, ..., side_k] of such tensors: the
  fused logit first, then side logits for deep supervision (loss.side_weights has one weight each).

The contract is checked when the network is built, on a dry batch that leaves no trace (the global
RNG is forked, BatchNorm statistics are put back): a run with a factory's network gives the same
results as one that skipped the check, and a broken network fails before any training starts, with
the factory's name and the shape it returned.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from salnet.config import ConfigError, ModelConfig

# The dry batch of the check: two images (BatchNorm in training needs more than one value per
# channel), not square (an H/W mix-up shows), sizes a stride-32 network takes.
DRY_BATCH = (2, 3, 64, 96)


def resolve_factory(path: str) -> Callable[[ModelConfig], nn.Module]:
    """The function `module.path:name` names; a ConfigError names the module or function that is not there."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(f"{e.name}.")):
            raise ConfigError(f"model.factory={path!r}: importing module {module_name!r} failed: {e}") from e
        raise ConfigError(
            f"model.factory={path!r}: cannot import module {module_name!r} ({e}); put the directory that holds it "
            f"on PYTHONPATH (or pip install its package) wherever salnet runs: every training rank, and predict, "
            f"evaluate and export, which rebuild the network from best.pt"
        ) from e
    except Exception as e:  # the module's own code failed: its error, with where it came from
        raise ConfigError(
            f"model.factory={path!r}: importing module {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"model.factory={path!r}: module {module_name!r} ({module.__file__}) has no {attr!r}")
    if not callable(factory):
        raise ConfigError(f"model.factory={path!r}: {attr!r} is a {type(factory).__name__}, not a function")
    return factory


def dry_output(model: nn.Module, training: bool) -> torch.Tensor | list | tuple:
    """`model`'s output on DRY_BATCH in training or eval mode; the model's mode, its buffers and the
    global RNG are left as they were. A real forward, not the meta device's: a user's network may
    hold operations the meta device lacks."""
    like = next(model.parameters(), None)
    device, dtype = (like.device, like.dtype) if like is not None else (torch.device("cpu"), torch.float32)
    image = torch.randn(DRY_BATCH, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    was_training = model.training
    saved = [b.clone() for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # dropout and the like draw from it
            return model.train(training)(image)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


def _check_contract(model: nn.Module, path: str) -> None:
    want = (DRY_BATCH[0], 1, *DRY_BATCH[2:])
    for training in (False, True):
        mode = "training" if training else "eval"
        try:
            out = dry_output(model, training)
        except Exception as e:
            e.add_note(f"(while salnet checked model.factory={path!r}'s network in {mode} mode on a {DRY_BATCH} batch)")
            raise
        if isinstance(out, torch.Tensor):
            returned, right = tuple(out.shape), out.shape == want
        elif isinstance(out, (list, tuple)):  # a list is for training only: predict takes a tensor
            returned = [tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out]
            right = training and bool(out) and all(shape == want for shape in returned)
        else:
            returned, right = f"a {type(out).__name__}", False
        if not right:
            raise ConfigError(
                f"model.factory={path!r}: in {mode} mode its network returned {returned} for a {DRY_BATCH} image "
                f"batch; salnet's contract: logits [B, 1, H, W] at the input size, here {want}, as a plain tensor "
                f"in eval mode, and in training that tensor or a list [fused, side logits...] of them"
            )


def build_from_factory(cfg: ModelConfig) -> nn.Module:
    """model.factory's network for `cfg`, its contract checked."""
    path = cfg.factory
    model = resolve_factory(path)(cfg)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory={path!r} returned a {type(model).__name__}, not a torch.nn.Module")
    _check_contract(model, path)
    return model
