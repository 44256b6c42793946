"""`python -m salnet.export`: a best.pt as a TorchScript or ONNX model for deployment.

    python -m salnet.export --checkpoint runs/NAME/best.pt --format torchscript --out salnet.pt
    python -m salnet.export --checkpoint runs/NAME/best.pt --format onnx --out salnet.onnx

The exported model takes `image`, float32 [B, 3, H, W], RGB scaled to [0, 1] and then normalised
with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), i.e.
(pixel / 255 - mean) / std, at any batch size, height and width (the network was validated at
best.pt's data.eval_size, printed on export; ONNX: at least 33 px; an ONNX export of a Swin
backbone: at one size, --onnx-size, default the eval size, since torchvision's Swin builds its
shifted-window mask from the input size in Python), and returns `saliency`, float32
[B, 1, H, W]: the probabilities sigmoid(fused logit) of the network in eval mode.

    # TorchScript (traced; the sizes stay dynamic)
    model = torch.jit.load("salnet.pt")
    saliency = model(image)
    # ONNX (opset 18, one self-contained file), e.g. with onnxruntime
    session = onnxruntime.InferenceSession("salnet.onnx", providers=["CPUExecutionProvider"])
    saliency = session.run(["saliency"], {"image": image.numpy()})[0]

Both files carry the metadata as JSON (TorchScript: extra file `salnet.json`; ONNX: metadata
property `salnet`): checkpoint (the best.pt's path), step, eval size, the input size it takes
("any", or [H, W]), mean, std. The file is
written under a temporary name beside OUT, loaded back and compared with eager PyTorch on random
inputs at two sizes (--check-sizes; a fixed-size ONNX export: at its size), printing the largest absolute difference; only then is it
renamed to OUT. A difference above --tolerance fails the export and leaves no file (a file already
at OUT stays as it was).

ONNX: torch.export's adaptive average pooling (the pyramid pooling module's) is only right for
input sizes it saw; it is decomposed here into two matrix products that hold for any size.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

from salnet.data import IMAGENET_MEAN, IMAGENET_STD
from salnet.evaluation.common import (
    BestWeights,
    EvaluationError,
    command_parser,
    load_best_weights,
    output_dirs,
    run_main,
)

PROG = "python -m salnet.export"
FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 18
MIN_SIDE = 33  # the smallest height and width torch.export accepts as dynamic for this network (C5 at least 2 px)


class Saliency(nn.Module):
    """image (ImageNet-normalised float32 [B, 3, H, W]) -> saliency probabilities [B, 1, H, W]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(image))


def pooling_matrix(length: torch.SymInt | int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """[bins, length]: row i averages [floor(i L / b), ceil((i + 1) L / b)), adaptive pooling's windows."""
    i = torch.arange(bins, device=like.device)
    start = (i * length) // bins
    end = ((i + 1) * length + bins - 1) // bins
    j = torch.arange(length, device=like.device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def adaptive_avg_pool2d(x: torch.Tensor, output_size) -> torch.Tensor:
    """F.adaptive_avg_pool2d for any input size, from operations every exporter keeps dynamic."""
    bins_h, bins_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    rows, cols = pooling_matrix(x.shape[-2], bins_h, x), pooling_matrix(x.shape[-1], bins_w, x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def broadcast_copy(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """aten.copy (what `mask[a:b, c:d] = value` becomes) as an explicit broadcast: torch.onnx writes
    aten.copy of a scalar as the scalar itself, and the graph then fails to load (Swin's attention mask)."""
    return src.to(dst.dtype).expand_as(dst).clone()


def metadata(best: BestWeights, size: int, fixed: tuple[int, int] | None) -> str:
    """`fixed`: the one input size (height, width) the file takes, or None (any size)."""
    height, width = fixed or ("H", "W")
    return json.dumps(
        {
            "checkpoint": str(best.path),
            "step": best.step,
            "run": best.run_name,
            "eval_size": size,
            "input_size": list(fixed) if fixed else "any",
            "input": f"image: float32 [B, 3, {height}, {width}], (rgb / 255 - mean) / std",
            "output": "saliency: float32 [B, 1, H, W] probabilities",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }
    )


def export_torchscript(module: Saliency, example: torch.Tensor, out: Path, meta: str):
    traced = torch.jit.trace(module, example, check_trace=False)
    torch.jit.save(traced, str(out), _extra_files={"salnet.json": meta})
    loaded = torch.jit.load(str(out), map_location="cpu")
    return lambda x: loaded(x)


def fixed_size_reason(model: nn.Module) -> str | None:
    """Why an ONNX graph of `model` holds at the input size it was exported at only (None: any size)."""
    if any(isinstance(m, ShiftedWindowAttention) for m in model.modules()):
        return (
            "torchvision's Swin builds its shifted-window mask in Python from the input size, which torch.export "
            "bakes into the graph"
        )
    return None


def export_onnx(module: Saliency, example: torch.Tensor, out: Path, meta: str, fixed_size: bool = False):
    """`fixed_size`: the graph takes example's height and width only (see fixed_size_reason); else any size.

    Height and width are Dim.AUTO, not named Dims: torchvision's ConvNeXt and ViT blocks raise
    guards that hold for every size (e.g. `1 % (768 * W) != 0`, a stride test) but that a named
    Dim's strict check cannot prove; the parity check at two sizes is what shows the graph holds.
    """
    import onnx
    import onnxruntime
    from torch.export import Dim

    aten = torch.ops.aten

    side = Dim.STATIC if fixed_size else Dim.AUTO(min=MIN_SIDE, max=8192)
    dims = {0: Dim("batch", min=1, max=4096), 2: side, 3: side}
    program = torch.export.export(module, (example,), dynamic_shapes={"image": dims})
    # Only what torch.onnx would get wrong is decomposed here; torch.onnx then decomposes the rest to
    # the operators ONNX has (a table of everything would grow the graph and double the export time).
    table = {op: adaptive_avg_pool2d for op in (aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)}
    table[aten.copy.default] = broadcast_copy
    program = program.run_decompositions(table)
    torch.onnx.export(
        program,
        f=str(out),
        input_names=["image"],
        output_names=["saliency"],
        opset_version=ONNX_OPSET,
        external_data=False,
        verbose=False,
    )
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, {"salnet": meta})
    onnx.save(proto, str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["saliency"], {"image": x.numpy()})[0])


def parse_size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    try:
        size = (int(height), int(width) if sep else int(height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW or S, e.g. 352x352") from None
    if min(size) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"size {text!r}: height and width must be at least {MIN_SIDE}")
    return size


def export(
    checkpoint_path: Path,
    fmt: str,
    out: Path,
    check_sizes: list[tuple[int, int]] | None,
    tolerance: float,
    batch: int = 2,
    onnx_size: tuple[int, int] | None = None,
) -> dict:
    """Export, check parity at `check_sizes` (None: the eval size and an odd non-square size) and rename to `out`.

    `onnx_size`: the input size of an ONNX export of a network whose graph holds at one size only
    (fixed_size_reason; default: the eval size, square); its parity is checked at that size only.
    """
    if fmt not in FORMATS:
        raise EvaluationError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if out.is_dir():
        raise EvaluationError(f"--out '{out}' is a folder; it names the file to write")
    output_dirs(out.parent, flag="--out's folder")
    best = load_best_weights(checkpoint_path)
    size = int(best.setting("data", "eval_size", 352))
    module = Saliency(best.model.float().cpu())
    reason = fixed_size_reason(module) if fmt == "onnx" else None
    example_size = (onnx_size or (size, size)) if reason else (size, size)
    if check_sizes is None:
        check_sizes = [example_size] if reason else [(size, size), (size + 37, max(MIN_SIDE, size - 29))]
    if reason and set(check_sizes) != {example_size}:
        other = next(s for s in check_sizes if s != example_size)
        raise EvaluationError(
            f"--check-sizes {other[0]}x{other[1]}: this network's ONNX graph holds at the size it is exported at only "
            f"({reason}); export it at that size with --onnx-size {other[0]}x{other[1]}, or use --format torchscript "
            "(any size)"
        )
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch, 3, *example_size, generator=gen)
    # Written under a temporary name and renamed only once it passed the parity check: whatever is
    # under `out` is a checked export (or what was there before).
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
    try:
        with torch.no_grad():
            meta = metadata(best, size, example_size if reason else None)
            if fmt == "torchscript":
                run = export_torchscript(module, example, tmp, meta)
            else:
                run = export_onnx(module, example, tmp, meta, fixed_size=reason is not None)
            parity = {}
            for height, width in check_sizes:
                x = torch.randn(batch, 3, height, width, generator=gen)
                expected, got = module(x), run(x)
                if got.shape != expected.shape:
                    raise EvaluationError(
                        f"{out}: output shape {tuple(got.shape)} for input {tuple(x.shape)}; eager PyTorch gives "
                        f"{tuple(expected.shape)}; not written"
                    )
                parity[f"{batch}x3x{height}x{width}"] = (got - expected).abs().max().item()
        for shape, diff in parity.items():
            print(f"export: {fmt} vs eager PyTorch at {shape}: max |diff| {diff:.3e}", flush=True)
        worst = max(parity.values())
        if not worst <= tolerance:
            raise EvaluationError(
                f"{out}: the exported model differs from eager PyTorch by up to {worst:.3e} "
                f"(> --tolerance {tolerance:g}); not written"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    shape = f"[B, 3, {example_size[0]}, {example_size[1]}] (this size only: {reason})" if reason else "[B, 3, H, W]"
    print(
        f"export: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; input 'image' float32 {shape} ImageNet-normalised, "
        f"validated at {size} px; output 'saliency' [B, 1, H, W] probabilities)",
        flush=True,
    )
    return {
        "format": fmt,
        "out": str(out),
        "parity": parity,
        "eval_size": size,
        "input_size": list(example_size) if reason else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run's best.pt (or one exported by convert)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path, help="the file to write")
    parser.add_argument(
        "--check-sizes",
        nargs="+",
        type=parse_size,
        metavar="HxW",
        help="input sizes of the parity check (default: the eval size, and an odd non-square size; an ONNX "
        "export of a fixed input size: that size)",
    )
    parser.add_argument(
        "--onnx-size",
        type=parse_size,
        metavar="HxW",
        help="the input size of an ONNX export of a Swin backbone, whose graph holds at one size only (default: "
        "the eval size); the other networks' ONNX graphs take any size",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest max |diff| accepted in the parity check (default: 1e-4)"
    )
    args = parser.parse_args(argv)

    def run() -> None:
        torch.set_num_threads(torch.get_num_threads())  # no process group: export is one process
        export(args.checkpoint, args.format, args.out, args.check_sizes, args.tolerance, onnx_size=args.onnx_size)

    run_main(PROG, run)
