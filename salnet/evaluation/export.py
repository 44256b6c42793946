"""`python -m salnet.export`: a best.pt as a TorchScript or ONNX model for deployment.

    python -m salnet.export --checkpoint runs/NAME/best.pt --format torchscript --out salnet.pt
    python -m salnet.export --checkpoint runs/NAME/best.pt --format onnx --out salnet.onnx

The exported model takes `image`, float32 [B, 3, H, W], RGB scaled to [0, 1] and then normalised
with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), i.e.
(pixel / 255 - mean) / std, at any batch size, height and width (the network was validated at
best.pt's data.eval_size, printed on export; ONNX: at least 33 px), and returns `saliency`, float32
[B, 1, H, W]: the probabilities sigmoid(fused logit) of the network in eval mode.

    # TorchScript (traced; the sizes stay dynamic)
    model = torch.jit.load("salnet.pt")
    saliency = model(image)
    # ONNX (opset 18, one self-contained file), e.g. with onnxruntime
    session = onnxruntime.InferenceSession("salnet.onnx", providers=["CPUExecutionProvider"])
    saliency = session.run(["saliency"], {"image": image.numpy()})[0]

Both files carry the metadata as JSON (TorchScript: extra file `salnet.json`; ONNX: metadata
property `salnet`): checkpoint (the best.pt's path), step, input size, mean, std. The file is
written under a temporary name beside OUT, loaded back and compared with eager PyTorch on random
inputs at two sizes (--check-sizes), printing the largest absolute difference; only then is it
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


def metadata(best: BestWeights, size: int) -> str:
    return json.dumps(
        {
            "checkpoint": str(best.path),
            "step": best.step,
            "run": best.run_name,
            "eval_size": size,
            "input": "image: float32 [B, 3, H, W], (rgb / 255 - mean) / std",
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


def export_onnx(module: Saliency, example: torch.Tensor, out: Path, meta: str):
    import onnx
    import onnxruntime
    from torch.export import Dim

    dims = {
        0: Dim("batch", min=1, max=4096),
        2: Dim("height", min=MIN_SIDE, max=8192),
        3: Dim("width", min=MIN_SIDE, max=8192),
    }
    program = torch.export.export(module, (example,), dynamic_shapes={"image": dims})
    table = torch.export.default_decompositions()
    for op in (torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten._adaptive_avg_pool2d.default):
        table[op] = adaptive_avg_pool2d
    table[torch.ops.aten.copy.default] = broadcast_copy
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
    checkpoint_path: Path, fmt: str, out: Path, check_sizes: list[tuple[int, int]], tolerance: float, batch: int = 2
) -> dict:
    if fmt not in FORMATS:
        raise EvaluationError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if out.is_dir():
        raise EvaluationError(f"--out '{out}' is a folder; it names the file to write")
    output_dirs(out.parent, flag="--out's folder")
    best = load_best_weights(checkpoint_path)
    size = int(best.setting("data", "eval_size", 352))
    module = Saliency(best.model.float().cpu())
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch, 3, size, size, generator=gen)
    # Written under a temporary name and renamed only once it passed the parity check: whatever is
    # under `out` is a checked export (or what was there before).
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
    try:
        with torch.no_grad():
            exporter = export_torchscript if fmt == "torchscript" else export_onnx
            run = exporter(module, example, tmp, metadata(best, size))
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
    print(
        f"export: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; input 'image' float32 [B, 3, H, W] ImageNet-normalised, "
        f"validated at {size} px; output 'saliency' [B, 1, H, W] probabilities)",
        flush=True,
    )
    return {"format": fmt, "out": str(out), "parity": parity, "eval_size": size}


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
        help="input sizes of the parity check (default: the eval size, and an odd non-square size)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest max |diff| accepted in the parity check (default: 1e-4)"
    )
    args = parser.parse_args(argv)

    def run() -> None:
        torch.set_num_threads(torch.get_num_threads())  # no process group: export is one process
        sizes = args.check_sizes
        if sizes is None:
            size = int(load_best_weights(args.checkpoint).setting("data", "eval_size", 352))
            sizes = [(size, size), (size + 37, max(MIN_SIDE, size - 29))]
        export(args.checkpoint, args.format, args.out, sizes, args.tolerance)

    run_main(PROG, run)
