"""`python -m salnet.bench plan`: a cost model on paper: per-GPU memory and step time of a training job.

For a config (the defaults, or --config FILE) on --nodes x --gpus-per-node GPUs it prints, per GPU:
weights, gradients, optimizer states (master copies included), communication buffers and
activations at the micro-batch (measured: a training-mode forward of the network and the loss,
counted by autograd's saved-tensor hooks), each as salnet's DDP or DeepSpeed ZeRO-1/2/3 partitions
it (salnet/bench/_plan_memory.py says how, and tests/test_bench_plan.py checks every model-state
term against a real 2-rank CPU step); then the time of each collective per optimizer step from its
message size and a stated bandwidth, against the compute time from a measured or stated per-GPU
throughput (salnet/bench/_plan_comm.py). Nothing here runs on a GPU.

Several --nodes, --strategy or --zero-stage values (comma-separated) print one row per combination
(the README's table). The assumptions are printed under the table; --json prints one JSON object.

    python -m salnet.bench plan --nodes 8 --gpus-per-node 8 --backbone swin_b --size 384 \\
        --strategy deepspeed --zero-stage 2 --micro-batch 4 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from salnet.bench import _plan_comm as comm
from salnet.bench import _plan_memory as memory
from salnet.config import Config, ConfigError, load_config

GIB = 2**30
# Defaults: an H100 SXM node. NVLink 4: 900 GB/s per GPU both ways together; 4 x 200 Gb/s InfiniBand.
INTRA_GBS = 450.0
INTER_GBS = 4 * 200 / 8
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 494.5}  # H100 SXM dense: bf16, and TF32 for fp32 matmuls
# No GPU measurement of salnet's Swin-B exists yet: a guess for a few images per GPU, to be replaced by --throughput.
DEFAULT_MFU = 0.2
GPU_MEMORY_GIB = 80.0
TERMS = ("weights", "gradients", "optimizer", "buffers", "activations")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _count(text: str) -> int:
    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return values[0]


def _strategies(text: str) -> list[str]:
    values = text.split(",")
    wrong = [v for v in values if v not in ("ddp", "deepspeed")]
    if wrong:
        raise argparse.ArgumentTypeError(f"unknown strategy {', '.join(map(repr, wrong))}; valid: ddp, deepspeed")
    return values


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m salnet.bench plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="a run config (YAML) to plan; default: salnet's defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, repeatable")
    p.add_argument("--nodes", type=_ints, default=[1], help="nodes, or a comma-separated list (default 1)")
    p.add_argument("--gpus-per-node", type=_count, default=8, help="GPUs (ranks) per node (default 8)")
    p.add_argument("--backbone", help="model.backbone.name")
    p.add_argument(
        "--size", type=int, help="data.size: training input px (and no data.multiscale: every batch at this size)"
    )
    p.add_argument("--micro-batch", type=int, help="data.batch_size: images per GPU per micro-batch")
    p.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        help="train.amp (bf16's activations are measured on real CPU tensors at --size: seconds, and GBs of RAM "
        "for large networks; fp32's on the meta device)",
    )
    p.add_argument("--strategy", type=_strategies, help="train.strategy, or a comma-separated list")
    p.add_argument("--zero-stage", type=_ints, help="train.zero_stage (1-3), or a comma-separated list")
    p.add_argument(
        "--intra-gbs", type=_positive, default=INTRA_GBS, help=f"a GPU's NVLink GB/s, one way (default {INTRA_GBS:g})"
    )
    p.add_argument(
        "--inter-gbs",
        type=_positive,
        default=INTER_GBS,
        help=f"a node's network GB/s, all NICs, one way (default {INTER_GBS:g}: 4 x 200 Gb/s InfiniBand)",
    )
    p.add_argument("--bandwidth", type=_positive, help="GB/s per rank of every ring, overriding the two above")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--throughput", type=_positive, help="measured training images/s per GPU")
    speed.add_argument("--tflops", type=_positive, help="achieved training TFLOP/s per GPU")
    speed.add_argument(
        "--mfu",
        type=_positive,
        default=DEFAULT_MFU,
        help=f"assumed fraction of --peak-tflops (default {DEFAULT_MFU}, used when neither of the above is given)",
    )
    p.add_argument("--peak-tflops", type=_positive, help="a GPU's dense peak (default: H100 SXM, 989 bf16, 494.5 TF32)")
    p.add_argument(
        "--gpu-memory-gib",
        type=_positive,
        default=GPU_MEMORY_GIB,
        help=f"to say what fits (default {GPU_MEMORY_GIB:g})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    if args.zero_stage and max(args.zero_stage) > 3:
        p.error(f"--zero-stage takes 1, 2 or 3, got {args.zero_stage}")
    try:
        args.configs = configs(args)
    except (ConfigError, ValueError) as e:
        p.error(str(e))
    return args


def configs(args) -> list[Config]:
    """One validated Config per planned (strategy, stage) from --config, --set and the flags."""
    flags = {
        "model.backbone.name": args.backbone,
        "data.size": args.size,
        "data.batch_size": args.micro_batch,
        "train.amp": args.precision,
    }
    base = [f"{key}={value}" for key, value in flags.items() if value is not None]
    base += ["data.multiscale=[]"] * (args.size is not None) + args.set
    base_cfg = load_config(args.config, base)
    strategies = args.strategy or [base_cfg.train.strategy]
    stages = args.zero_stage or [base_cfg.train.zero_stage]
    plans = []
    for strategy in strategies:
        for stage in stages if strategy == "deepspeed" else [None]:
            extra = [f"train.strategy={strategy}"] + ([f"train.zero_stage={stage}"] if stage else [])
            plans.append(load_config(args.config, base + extra))
            memory.check_modelled(plans[-1])
    return plans


def label(cfg: Config) -> str:
    return "DDP" if cfg.train.strategy == "ddp" else f"ZeRO-{cfg.train.zero_stage}"


def images_per_s(cfg: Config, args) -> tuple[float, str]:
    """Training images/s per GPU and where the figure comes from."""
    if args.throughput:
        return args.throughput, f"{args.throughput:g} img/s per GPU (stated)"
    from salnet.model.cost import meta_model, train_flops_per_image

    model, sizes = meta_model(cfg.model), memory.training_sizes(cfg)
    # A multiscale batch draws its size from the list: the mean of their FLOPs.
    flops = sum(train_flops_per_image(model, size, size) for size in sizes) / len(sizes)
    per_image = f"{flops / 1e9:.0f} GFLOPs per training image" + (
        f" (the mean over data.multiscale={sizes})" if len(sizes) > 1 else ""
    )
    if args.tflops:
        return args.tflops * 1e12 / flops, f"{args.tflops:g} TFLOP/s per GPU (stated) / {per_image}"
    peak = args.peak_tflops or PEAK_TFLOPS[cfg.train.amp]
    return args.mfu * peak * 1e12 / flops, f"MFU {args.mfu:g} (assumed) x {peak:g} TFLOP/s peak / {per_image}"


def plan_one(cfg: Config, shape, acts, speed: tuple[float, str], nodes: int, args) -> dict:
    """Every figure of one (config, node count): memory per GPU by term, collectives and step time."""
    world = nodes * args.gpus_per_node
    mem = memory.model_states(shape, cfg, world)
    mem["activations"] = acts.at(cfg.data.batch_size)
    gbs = args.bandwidth or comm.Network(args.intra_gbs, args.inter_gbs).ring_gbs(nodes)
    step = comm.step_time(cfg, comm.collectives(cfg, shape.total, world, gbs), speed[0])
    total = sum(mem.values())
    return {
        "strategy": label(cfg),
        "nodes": nodes,
        "gpus": world,
        "micro_batch": cfg.data.batch_size,
        "global_batch": cfg.global_batch(world),
        "memory_bytes": {**mem, "total": total},
        "fits": total <= args.gpu_memory_gib * GIB,
        "ring_gbs": gbs,
        "collectives_s": {c.name: c.seconds for c in step.collectives},
        "hidden_by_backward": [c.name for c in step.collectives if c.hidden_by_backward],
        "compute_s": step.compute_s,
        "comm_s": step.comm_s,
        "step_s": step.step_s,
        "images_per_s": cfg.global_batch(world) / step.step_s,
        "scaling": step.compute_s / step.step_s,
        "layout": memory.layout(cfg),
    }


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def markdown(plans: list[dict]) -> str:
    """One row per plan: memory per GPU (GiB) by term, then milliseconds per optimizer step."""
    lines = [
        "| GPUs | strategy | weights | grads | optimizer | buffers | activations | total GiB | comm ms | "
        "compute ms | step ms | img/s | scaling |",
        "|---|---|" + "---:|" * 11,
    ]
    for plan in plans:
        m = plan["memory_bytes"]
        total = gib(m["total"]) + ("" if plan["fits"] else " (too big)")
        lines.append(
            f"| {plan['nodes']}x{plan['gpus'] // plan['nodes']} | {plan['strategy']} | "
            + " | ".join(gib(m[t]) for t in TERMS)
            + f" | {total} | {ms(plan['comm_s'])} | {ms(plan['compute_s'])} | {ms(plan['step_s'])} | "
            f"{plan['images_per_s']:.0f} | {plan['scaling']:.2f} |"
        )
    return "\n".join(lines)


def details(plan: dict, with_layout: bool) -> str:
    """One plan's memory terms (with how each is laid out across ranks), and its collectives with their times."""
    lines = [f"{plan['strategy']} on {plan['gpus']} GPUs: per GPU"]
    for term, how in plan["layout"].items():
        lines.append(f"  {term}: {gib(plan['memory_bytes'][term])} GiB" + (f" ({how})" if with_layout else ""))
    lines.append(f"  ring at {plan['ring_gbs']:g} GB/s per rank:")
    for name, seconds in plan["collectives_s"].items():
        hidden = "overlaps backward" if name in plan["hidden_by_backward"] else "exposed"
        lines.append(f"    {name}: {ms(seconds)} ms ({hidden})")
    if not plan["collectives_s"]:
        lines.append("    no collectives (one GPU)")
    return "\n".join(lines)


def assumptions(cfg: Config, shape, acts, args, activation_s: float) -> list[str]:
    return [
        f"network: {cfg.model.backbone.name} at {'/'.join(map(str, memory.training_sizes(cfg)))} px, {shape.total / 1e6:.1f} M trainable parameters "
        f"in {len(shape.groups)} optimizer groups; optim.name={cfg.optim.name}; train.amp={cfg.train.amp}"
        + (" (autocast: float32 weights, gradients, optimizer states and messages)" if cfg.train.amp == "bf16" else ""),
        f"activations: saved tensors of one training forward (network + loss) at {acts.size} px, measured on "
        f"{acts.device} in "
        f"{activation_s:.1f} s: {acts.per_image / 2**20:.0f} MiB per image"
        + (f" + {acts.constant / 2**20:.0f} MiB of autocast's bf16 weight copies" if acts.constant > 2**20 else "")
        + "; a GPU adds kernel workspaces and allocator slack on top",
        "buffers: DDP's reducer buckets (a second gradient copy); ZeRO-3's reduce bucket "
        f"(train.bucket_mb={cfg.train.bucket_mb}) and its gathered weights at DeepSpeed's default bound "
        "(stage3_max_live_parameters=1e9: the whole network); ZeRO-1/2's reduce bucket lives inside backward only",
        f"bandwidth: {args.intra_gbs:g} GB/s NVLink per GPU within a node, {args.inter_gbs:g} GB/s per node across "
        "nodes, one way"
        + (f"; overridden: {args.bandwidth:g} GB/s per rank" if args.bandwidth else "")
        + "; ring bandwidth term only, latency left out",
        f"gpu memory: {args.gpu_memory_gib:g} GiB",
    ]


def main(argv):
    args = parse(argv)
    first = args.configs[0]
    shape = memory.model_shape(first)
    started = time.perf_counter()
    acts = memory.activations(first)  # the same network, size and precision for every plan
    activation_s = time.perf_counter() - started
    speed = images_per_s(first, args)  # per GPU: the same network, size and precision for every plan
    plans = [plan_one(cfg, shape, acts, speed, nodes, args) for nodes in args.nodes for cfg in args.configs]
    notes = assumptions(first, shape, acts, args, activation_s) + [f"compute: {speed[1]}"]
    if args.json:
        print(json.dumps({"benchmark": "plan", "plans": plans, "assumptions": notes}), flush=True)
        return
    print(markdown(plans))
    print()
    described = set()
    for plan in plans:  # each strategy's layout once
        print(details(plan, with_layout=plan["strategy"] not in described))
        described.add(plan["strategy"])
    print("\nassumptions:\n" + "\n".join(f"- {note}" for note in notes), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
