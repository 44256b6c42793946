"""`python -m salnet.bench gpu`: the GPU check, one JSON line in at most ~8 minutes on one GPU.

1. step: FPN+PPM on each --backbone (default resnet50; repeat it or give a comma list to compare
   families) at 352 px, batch 32, bf16, channels_last, salnet's train_step on in-memory batches,
   eager and torch.compile: images/s, MFU against the GPU's dense bf16 peak (PEAK_BF16_TFLOPS
   below; the entry used is printed with its source; FLOPs from salnet.model.cost, the model
   report's counter), peak memory. Every torchvision family traces into one graph without breaks
   (torch._dynamo.explain, training mode, with and without checkpointing), so every family is
   compiled; a family whose compile fails, or a step that runs out of memory, is reported with
   its error and the others go on.
2. feed: the real loader (synthetic 400 px JPEG shards, every host core but one as a worker)
   feeding the eager step, with data.augment_on=worker and =device: images/s, the fraction of
   the time spent waiting for data, and the device side's augmentation time per batch.
3. metrics: SODMetrics on the GPU against PySODMetrics (`python -m salnet.bench metrics`): speed
   and the largest difference.
4. memory: ZeRO-2 against DDP (`python -m salnet.bench step`'s workers): per-rank memory held
   between steps and peak. ZeRO partitions across ranks: on one GPU nothing is partitioned and
   this shows DeepSpeed's own overhead; with 2+ GPUs every GPU takes part.

Parts 2-4 use the first --backbone. The parts run in that order (--parts picks some), torch.compile
last, each (and the step of each backbone) only if the time left (--budget-s) covers its estimate;
a skipped one is listed under "skipped". Targets, for the first --backbone: MFU >= 40% (compiled)
and a data wait below 5% with data.augment_on=device. Without CUDA it stops at once, saying so; its CPU
parts are exercised, at toy sizes, by tests/test_bench_gpu.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from salnet.bench import metrics as metrics_bench
from salnet.bench import step as step_bench
from salnet.bench._harness import emit, machine, parser, ratio
from salnet.config import check_backbone_name
from salnet.shards.parallel import available_cpus

# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, matched in this order against
# torch.cuda.get_device_name(): (pattern, TFLOPS, source). The datasheets give the sparse figure
# with an asterisk; dense is half of it.
PEAK_BF16_TFLOPS = (
    (r"H200 NVL", 835.5, "NVIDIA H200 Tensor Core GPU datasheet: H200 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"H200", 989.5, "NVIDIA H200 Tensor Core GPU datasheet: H200 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"H100 NVL", 835.5, "NVIDIA H100 Tensor Core GPU datasheet: H100 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (
        r"H100 PCIe",
        756.5,
        "NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe BF16 Tensor Core 1,513 TFLOPS with sparsity",
    ),
    (r"H100", 989.5, "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"A100", 312.0, "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    (r"L40S", 362.05, "NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"),
    (r"\bL4\b", 121.0, "NVIDIA L4 Tensor Core GPU datasheet: BF16 Tensor Core 242 TFLOPS with sparsity"),
    (r"\bA10\b", 125.0, "NVIDIA A10 Tensor Core GPU datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)"),
)
TARGETS = {"mfu": 0.40, "data_wait_device": 0.05}
# Rough seconds each part needs on a GPU node (start-up included): a part runs only if the time left covers it.
# "step" and "compile" are per backbone.
ESTIMATE_S = {"step": 40, "feed": 60, "metrics": 60, "memory": 150, "compile": 180}
PARTS = ("step", "feed", "metrics", "memory", "compile")
MODES = ("worker", "device")
ERROR_CHARS = 500


def names_list(text: str, known) -> list[str]:
    """'a,b' -> ['a', 'b'], each checked by `known` (a ValueError becomes argparse's error)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    try:
        for name in names:
            known(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names


def check_part(name: str) -> None:
    if name not in PARTS:
        raise ValueError(f"unknown part {name!r}; the parts: {', '.join(PARTS)}")


def parse(argv: list[str]):
    p = parser("gpu", __doc__.split("\n\n")[0], repeats=3)
    p.add_argument(
        "--backbone",
        dest="backbones",
        action="append",
        type=lambda text: names_list(text, check_backbone_name),
        metavar="NAME[,NAME...]",
        help="backbone(s) whose step is measured, repeatable (default resnet50); parts 2-4 use the first",
    )
    p.add_argument(
        "--parts",
        type=lambda text: names_list(text, check_part),
        default=list(PARTS),
        metavar="PART[,PART...]",
        help=f"the parts to run (default all: {','.join(PARTS)})",
    )
    p.add_argument("--size", type=int, default=352, help="training size in pixels (default 352)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch (default 32)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat of the step measurement (default 30)")
    p.add_argument("--feed-steps", type=int, default=40, help="timed steps the loader feeds, per mode (default 40)")
    p.add_argument(
        "--image-size", type=int, default=400, help="side of the synthetic stored scenes (default 400, like DUTS)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, available_cpus() - 1),
        help="loader workers (default: the host's CPUs minus one for the training process)",
    )
    p.add_argument(
        "--metrics-images", type=int, default=100, help="image pairs of 300 x 400 for the metrics part (default 100)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=480,
        help="wall-clock budget; parts that would overrun it are skipped (default 480)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of a GPU missing from the table")
    args = p.parse_args(argv)
    args.backbones = list(dict.fromkeys(name for names in args.backbones or [["resnet50"]] for name in names))
    args.backbone = args.backbones[0]
    return args


def peak_bf16(name: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOPS, source) of the GPU called `name`, or None if the table does not know it."""
    return next(((tflops, source) for pattern, tflops, source in PEAK_BF16_TFLOPS if re.search(pattern, name)), None)


def step_args(args, device: str, backbone: str | None = None):
    """The arguments salnet.bench.step's helpers take, for this run's sizes and `backbone` (default: the first)."""
    shape = step_bench.shape_of(args, device=device, backbone=backbone or args.backbone)
    return step_bench.parse(step_bench.shape_argv(shape))


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure_step(args, device: str, compile: bool, peak_tflops: float | None, backbone: str | None = None) -> dict:
    """salnet's train_step on in-memory batches with `backbone` (default: the first): images/s (median of
    repeats), MFU, peak memory."""
    from salnet import dist
    from salnet.model import build_model
    from salnet.model.cost import meta_model, train_flops_per_image
    from salnet.run.runlog import peak_memory_mib

    sargs = step_args(args, device, backbone)
    cfg = step_bench.bench_config(sargs, ["train.compile=true"] if compile else [])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    _reset_peak(dist.device())
    step_fn, _, _ = step_bench.salnet_step_of(cfg, model)
    batches = step_bench.fake_batches(sargs, 4)
    if dist.device().type == "cuda":  # as the loader hands them over: pinned, so the copy is asynchronous
        batches = [{k: v.pin_memory() for k, v in batch.items()} for batch in batches]
    if compile:
        step_fn(batches[0])  # compiling takes a step or two; timed_steps warms up with one more
    seconds = statistics.median(step_bench.timed_steps(step_fn, batches, sargs.steps) for _ in range(args.repeats))
    img_s = args.batch / seconds
    flops = train_flops_per_image(meta_model(cfg.model), args.size, args.size)
    return {
        "img_s": round(img_s, 1),
        "train_gflops_per_image": round(flops / 1e9, 2),
        "mfu": round(img_s * flops / (peak_tflops * 1e12), 4) if peak_tflops else None,
        "peak_memory_mib": round(peak_memory_mib(), 1),
    }


def measure_backbones(args, device: str, compile: bool, peak_tflops: float | None, due) -> dict[str, dict]:
    """measure_step for every --backbone that `due(part, backbone)` lets run. A step that runs out of
    memory, or (compiled) fails to compile, is that backbone's error and the next one goes on."""
    from salnet.run.runlog import peak_memory_mib

    part = "compile" if compile else "step"
    results = {}
    for name in args.backbones:
        if not due(part, name):
            continue
        try:
            results[name] = measure_step(args, device, compile, peak_tflops, backbone=name)
        except torch.OutOfMemoryError:
            results[name] = {"error": f"out of memory at batch {args.batch} (peak {peak_memory_mib():.0f} MiB)"}
        except Exception as e:
            if not compile:
                raise  # an eager step that fails is a bug, not a measurement
            results[name] = {"error": f"torch.compile: {type(e).__name__}: {e}"[:ERROR_CHARS]}
        print(f"step, {name}, {'torch.compile' if compile else 'eager'}: {results[name]}", flush=True)
        # What one backbone leaves behind (cached blocks, compiled graphs) is not the next one's.
        gc.collect()
        if compile:
            torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def measure_feed(args, device: str, train_dir: Path, mode: str) -> dict:
    """The real loader (args.workers workers, data.augment_on=mode) feeding the eager train_step."""
    from salnet import dist
    from salnet.data import TrainInput, TrainStream
    from salnet.model import build_model
    from salnet.run.runlog import DataClock

    sargs = step_args(args, device)
    cfg = step_bench.bench_config(
        sargs, [f"data.train=[{train_dir}]", f"data.augment_on={mode}", f"data.workers={args.workers}"]
    )
    torch.manual_seed(0)
    step_fn, _, _ = step_bench.salnet_step_of(cfg, build_model(cfg.model))
    stream = TrainStream(cfg.data, seed=0, rank=0, world_size=1)
    clock = DataClock()
    batches = clock.timed(stream.epoch_batches(0))
    batch = next(batches)
    step_fn(batch)  # warm-up: the workers are running, the kernels chosen
    step_bench.sync()
    waited, started, steps = clock.waiting, time.perf_counter(), 0
    for steps, batch in enumerate(batches, start=1):
        step_fn(batch)
        if steps == args.feed_steps:
            break
    step_bench.sync()
    elapsed = time.perf_counter() - started
    result = {
        "steps": steps,
        "img_s": round(steps * args.batch / elapsed, 1),
        "data_wait": round((clock.waiting - waited) / elapsed, 4),
    }
    if "extent" in batch:  # what the device side's warp and jitter of one batch cost on its own
        adjust_input = TrainInput(cfg.data, dist.device(), channels_last=True)
        seconds = step_bench.timed_steps(adjust_input, [batch], 10)
        result["device_augment_ms_per_batch"] = round(seconds * 1000, 2)
    return result


def measure_metrics(args, device: str) -> dict:
    """`python -m salnet.bench metrics` on `device` (its JSON line, without its printout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        metrics_bench.main(["--device", device, "--images", str(args.metrics_images), "--repeats", str(args.repeats)])
    report = json.loads(out.getvalue().splitlines()[-1])
    return {name: report[name] for name in metrics_bench.WORKLOADS}


def measure_memory(args, device: str) -> dict:
    """DDP against ZeRO-2, each in its own process(es) on every visible GPU: per-rank memory and images/s."""
    sargs = step_args(args, device)
    world = max(1, torch.cuda.device_count()) if device == "cuda" else 1
    runs = {name: step_bench.run_workers(sargs, world, step_bench.ZERO_RUNS[name]) for name in ("ddp", "zero2")}
    # A high-water mark that did not rise (a toy model on a CPU, whose RSS peaked while loading) has no ratio.
    peak_ratio = (
        ratio(runs["zero2"]["peak_growth_mib"], runs["ddp"]["peak_growth_mib"])
        if runs["ddp"]["peak_growth_mib"] > 0
        else None
    )
    return {
        "world": world,
        **runs,
        "zero2_held_vs_ddp": ratio(runs["zero2"]["held_mib"], runs["ddp"]["held_mib"]),
        "zero2_peak_vs_ddp": peak_ratio,
        "note": "one rank: ZeRO has nothing to partition; the difference is DeepSpeed's own"
        if world == 1
        else f"{world} ranks: optimizer states and gradients partitioned {world} ways",
    }


def synthetic_shards(root: Path, args) -> Path:
    from salnet.shards.synth import synthesize

    samples = args.batch * (args.feed_steps + 2 + args.workers)  # every worker makes at least one batch
    train_dir, _ = synthesize(root, train=samples, val=1, size=args.image_size, workers=available_cpus())
    return train_dir


def main(argv: list[str]) -> None:
    args = parse(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "python -m salnet.bench gpu: needs a CUDA GPU and sees none (torch.cuda.is_available() is False: "
            "no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them); `python -m salnet.bench step` and "
            "`python -m salnet.bench data` measure a CPU-only machine"
        )
    from salnet import dist

    started = time.perf_counter()
    dist.init(use_cuda=True)
    name = torch.cuda.get_device_name()
    known = peak_bf16(name)
    peak, source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else (known or (None, None))
    print(
        f"{name}: dense bf16 peak {peak} TFLOPS ({source or 'not in the table: pass --peak-tflops for MFU'})",
        flush=True,
    )
    report = {
        "benchmark": "gpu",
        "gpu": name,
        "peak_bf16_tflops": peak,
        "peak_source": source,
        "torch": torch.__version__,
        "backbones": args.backbones,
        "parts": args.parts,
        "size": args.size,
        "batch": args.batch,
        "workers": args.workers,
        **machine(),
        "step": {},
        "feed": {},
        "skipped": [],
    }

    def due(part: str, backbone: str | None = None) -> bool:
        if part not in args.parts:
            return False
        left = args.budget_s - (time.perf_counter() - started)
        if left < ESTIMATE_S[part]:
            what = f"{part} {backbone}" if backbone else part
            report["skipped"].append(
                f"{what}: {left:.0f} s left of --budget-s {args.budget_s:.0f}, it needs ~{ESTIMATE_S[part]} s"
            )
            print(f"skipped {report['skipped'][-1]}", flush=True)
            return False
        return True

    for name, run in measure_backbones(args, "cuda", compile=False, peak_tflops=peak, due=due).items():
        report["step"][name] = {"eager": run}
    with tempfile.TemporaryDirectory(prefix="salnet-bench-gpu-") as tmp:
        train_dir = synthetic_shards(Path(tmp), args) if due("feed") else None
        for mode in MODES:
            if train_dir is not None and due("feed"):
                report["feed"][mode] = measure_feed(args, "cuda", train_dir, mode)
                print(f"feed, augment_on={mode}: {report['feed'][mode]}", flush=True)
    if due("metrics"):
        report["metrics"] = measure_metrics(args, "cuda")
        print(f"metrics on the GPU vs PySODMetrics: {report['metrics']}", flush=True)
    if due("memory"):
        report["memory"] = measure_memory(args, "cuda")
        print(f"memory, ZeRO-2 vs DDP: {report['memory']}", flush=True)
    for name, run in measure_backbones(args, "cuda", compile=True, peak_tflops=peak, due=due).items():
        report["step"].setdefault(name, {})["compile"] = run

    first = report["step"].get(args.backbone, {}).values()
    mfu = max((run.get("mfu") or 0 for run in first), default=None)
    wait = report["feed"].get("device", {}).get("data_wait")
    report["targets"] = TARGETS
    report["meets_targets"] = {
        "mfu": None if not mfu else mfu >= TARGETS["mfu"],
        "data_wait_device": None if wait is None else wait < TARGETS["data_wait_device"],
    }
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    emit(report)


if __name__ == "__main__":
    main(sys.argv[1:])
