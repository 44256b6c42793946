"""The model report: `python -m salnet.model --backbone resnet50 --size 352`.

`--backbones` lists every backbone name by family.

Prints the parameter count, the FLOPs of one eval-mode forward pass (torch.utils.flop_counter)
and the per-image shapes of C2..C5, PPM, P2..P5 and the outputs, for any backbone and input size.
Takes the shared config arguments too, so `--config configs/X.yaml` reports that run's network.
The network is built on the meta device (salnet.model.cost): shapes and FLOPs depend on no weights,
so even vit_h_14 takes seconds and no memory.
"""

from __future__ import annotations

import argparse
import sys

import torch

from salnet.config import ConfigError, add_config_arguments, config_from_args
from salnet.model.backbone import backbone_names
from salnet.model.cost import TRAIN_COUNT_BATCH, forward_flops, meta_model, parameter_counts
from salnet.model.salnet import SalNet


def input_size(text: str) -> tuple[int, int]:
    """'352' -> (352, 352); '353x97' -> (353, 97): height x width."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a size: give pixels as H (square) or HxW, e.g. 352 or 353x97"
        )
    return int(parts[0]), int(parts[-1])


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape[1:])) + "]"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M ({n:,})"


def record_shapes(model: SalNet, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of C2..C5, PPM and P2..P5 from one forward pass, through forward hooks."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, out: seen.extend((k.upper(), v) for k, v in out.items())),
        model.ppm.register_forward_hook(lambda m, i, out: seen.append(("PPM", out))),
        model.fpn.register_forward_hook(
            lambda m, i, out: seen.extend((f"P{level}", p) for level, p in enumerate(out, start=2))
        ),
    ]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def report(model: SalNet, height: int, width: int) -> str:
    counts = parameter_counts(model)
    lines = [
        f"input: 3 x {height} x {width} (shapes below are per image: [C, H, W])",
        f"parameters: {_millions(counts.total)}; backbone {_millions(counts.backbone)}, "
        f"decoder {_millions(counts.total - counts.backbone)}; trainable {_millions(counts.trainable)}",
    ]

    model.eval()
    flops = forward_flops(model, height, width)
    lines.append(
        f"forward, eval mode, one image: {flops / 1e9:.2f} GFLOPs = {flops / 2e9:.2f} GMACs "
        f"(torch.utils.flop_counter counts a multiply-add as 2 FLOPs)"
    )
    x = torch.zeros(1, 3, height, width, device=next(model.parameters()).device)
    with torch.no_grad():
        for name, tensor in record_shapes(model, x):
            lines.append(f"  {name:<16}{_shape(tensor)}")
        lines.append(f"  {'output (eval)':<16}{_shape(model(x))}  fused logits")
        model.train()
        outputs = model(x.expand(TRAIN_COUNT_BATCH, -1, -1, -1))
    names = ["fused"] + [f"side_P{level}" for level in range(2, len(outputs) + 1)]
    lines.append(f"  {'outputs (train)':<16}" + ", ".join(f"{n} {_shape(o)}" for n, o in zip(names, outputs)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m salnet.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", metavar="NAME", help="overrides model.backbone.name (see --backbones)")
    parser.add_argument("--backbones", action="store_true", help="list every backbone name by family, and exit")
    parser.add_argument(
        "--size", type=input_size, metavar="H[xW]", help="input size in pixels, e.g. 352 or 353x97 (default: data.size)"
    )
    args = add_config_arguments(parser).parse_args(argv)
    if args.backbones:
        for family, names in backbone_names().items():
            print(f"{family:<10}" + " ".join(names))
        return
    if args.backbone:  # validated by the schema, which names the families of an unknown name
        args.overrides = [*args.overrides, f"model.backbone.name={args.backbone}"]
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    height, width = args.size or (cfg.data.size, cfg.data.size)

    model_cfg = cfg.model
    print(
        f"salnet model: {model_cfg.backbone.name}, ppm_bins {model_cfg.ppm_bins}, ppm_width {model_cfg.ppm_width}, "
        f"fpn_width {model_cfg.fpn_width}, fuse {model_cfg.fuse}, norm {model_cfg.norm}, "
        f"frozen_bn {model_cfg.backbone.frozen_bn}"
    )
    print(report(meta_model(model_cfg), height, width))


if __name__ == "__main__":
    main(sys.argv[1:])
