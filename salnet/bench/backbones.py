"""`python -m salnet.bench backbones`: the table of supported backbones, each in salnet's full network.

Per backbone: parameters and the GFLOPs of one eval-mode forward pass at 352 and 384 px (the
model report's counter, salnet.model.cost, on the meta device: no weights, no memory), the
ImageNet files torchvision or timm publish for it (read from their registries, nothing
downloaded), and the CPU time of one training step (forward, loss, backward, AdamW step: salnet's
train_step, random init, fp32, channels_last) per image, against resnet50 in the same process.

Each backbone's timing is interleaved with resnet50's, repeat by repeat, and its ratio is the
ratio of the two medians: a change in the machine's load between backbones moves both alike.
Backbones above --time-max-mparams parameters are counted but not timed (their steps take
minutes on a CPU core and their optimizer state gigabytes). Timing runs at --size (default 160,
batch 2, one thread: affordable on a shared 2-core machine); CPU ratios say which backbones are
dear, not what a GPU will give (`python -m salnet.bench gpu --backbone NAMES` measures that).
The table is printed in Markdown (the README's), then the JSON line.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from salnet.bench import step as step_bench
from salnet.bench._harness import emit, interleaved, machine, parser, ratio
from salnet.config import BACKBONE_FAMILIES, TIMM_FAMILY, TIMM_PREFIX, backbone_family, check_backbone_name

BASELINE = "resnet50"
FLOPS_SIZES = (352, 384)
# The timm rows of the default table: the backbone of configs/duts_pvtv2_b2.yaml and its smallest sibling.
TIMM_ROWS = ("timm/pvt_v2_b0", "timm/pvt_v2_b2")


def default_backbones() -> list[str]:
    """Every torchvision backbone, then TIMM_ROWS if timm (an optional extra) is installed."""
    names = [name for names in BACKBONE_FAMILIES.values() for name in names]
    try:
        import timm  # noqa: F401
    except ImportError:
        return names
    return names + list(TIMM_ROWS)


def parse(argv):
    p = parser("backbones", __doc__.split("\n\n")[0], repeats=3)
    p.add_argument(
        "--backbone",
        dest="backbones",
        action="append",
        metavar="NAME",
        help="a backbone to include, repeatable (default: every torchvision one, and a few timm ones if installed)",
    )
    p.add_argument("--size", type=int, default=160, help="input px of the timed step (default 160)")
    p.add_argument("--batch", type=int, default=2, help="images per timed step (default 2)")
    p.add_argument(
        "--steps", type=int, default=1, help="timed steps per repeat (default 1; one warm-up step per backbone)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument(
        "--time-max-mparams",
        type=float,
        default=100,
        help="backbones whose network has more million parameters are not timed (default 100)",
    )
    args = p.parse_args(argv)
    args.backbones = args.backbones or default_backbones()
    for name in args.backbones:
        try:
            check_backbone_name(name)
        except ValueError as e:
            p.error(str(e))
    return args


def published_weights(name: str) -> list[str]:
    """The pretrained files torchvision (its weights enum) or timm (its pretrained tags) has for `name`."""
    if backbone_family(name) == TIMM_FAMILY:
        import timm

        model = name.removeprefix(TIMM_PREFIX).split(".")[0]
        return [tag for tag in timm.list_pretrained(f"{model}*") if tag.split(".")[0] == model]
    from torchvision.models import get_model_weights

    return [entry.name for entry in get_model_weights(name)]  # iterating an enum skips aliases (DEFAULT)


def bench_config(name: str, args):
    """The default network (decoder widths 256) on backbone `name`; fp32 AdamW at --size and --batch."""
    from salnet.config import load_config

    return load_config(
        None,
        [f"model.backbone.name={name}", f"data.size={args.size}", f"data.batch_size={args.batch}", "train.amp=fp32"],
    )


def count(name: str, args) -> dict:
    """Parameters and GFLOPs at each of FLOPS_SIZES of salnet's network on `name`, built on the meta device."""
    from salnet.model.cost import forward_flops, meta_model, parameter_counts

    model = meta_model(bench_config(name, args).model).eval()
    return {
        "params_m": round(parameter_counts(model).total / 1e6, 2),
        **{f"gflops_{size}": round(forward_flops(model, size, size) / 1e9, 1) for size in FLOPS_SIZES},
    }


def train_step(name: str, args):
    """A function timing salnet's train_step on `name` (random init) over in-memory batches: seconds per
    step. The warm-up step is taken here, once, so a repeat costs only its timed steps."""
    from salnet.model import build_model

    cfg = bench_config(name, args)
    torch.manual_seed(0)
    step_fn, _, _ = step_bench.salnet_step_of(cfg, build_model(cfg.model))
    batches = step_bench.fake_batches(args, args.steps)
    step_fn(batches[0])

    def seconds_per_step(_repeat: int) -> float:
        started = time.perf_counter()
        for batch in batches:
            step_fn(batch)
        return (time.perf_counter() - started) / len(batches)

    return seconds_per_step


def measure(args) -> dict:
    """Every backbone's row: counts, published weights and, within --time-max-mparams, its step timed against
    BASELINE's (ms per image, and the ratio of medians)."""
    baseline = train_step(BASELINE, args)
    baseline_seconds: list[float] = []
    rows = {}
    for name in args.backbones:
        row = {**count(name, args), "weights": published_weights(name)}
        print(f"{name}: {row}", file=sys.stderr, flush=True)
        if name != BASELINE and row["params_m"] > args.time_max_mparams:
            row["timed"] = False
        else:
            contenders = {name: train_step(name, args)} if name != BASELINE else {}
            results = interleaved(args.repeats, {**contenders, BASELINE: baseline})
            baseline_seconds += results[BASELINE]
            own = statistics.median(results[name])
            row.update(
                timed=True,
                ms_per_img=round(own * 1000 / args.batch, 1),
                vs_resnet50=ratio(own, statistics.median(results[BASELINE])),
            )
            print(f"  step: {row['ms_per_img']} ms/img, {row['vs_resnet50']}x {BASELINE}", file=sys.stderr, flush=True)
        rows[name] = row
    return {
        "rows": rows,
        "baseline_ms_per_img": round(statistics.median(baseline_seconds) * 1000 / args.batch, 1),
    }


def markdown(rows: dict, args) -> str:
    """The README's table. The step's ratio, not its milliseconds: on a shared machine only the ratio,
    measured against an interleaved baseline, means something from one run to the next."""
    lines = [
        "| backbone | params (M) | GFLOPs 352 | GFLOPs 384 | ImageNet weights | train step vs resnet50 (CPU) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, row in rows.items():
        timing = f"{row['vs_resnet50']:.2f}x" if row["timed"] else f"not timed (> {args.time_max_mparams:.0f} M params)"
        lines.append(
            f"| {name} | {row['params_m']:.1f} | {row['gflops_352']:.1f} | {row['gflops_384']:.1f} | "
            f"{', '.join(row['weights']) or 'none'} | {timing} |"
        )
    return "\n".join(lines)


def main(argv):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    from salnet import dist

    dist.init(use_cuda=False)
    report = {
        "benchmark": "backbones",
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "flops_sizes": list(FLOPS_SIZES),
        **machine(),
        **measure(args),
    }
    report["loadavg_1m_end"] = machine()["loadavg_1m"]
    print(markdown(report["rows"], args), flush=True)
    emit(report)


if __name__ == "__main__":
    main(sys.argv[1:])
