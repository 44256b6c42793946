"""`python -m salnet.bench gpu`: the GPU check, one JSON line in at most ~8 minutes on one GPU.

1. step: ResNet-50 FPN+PPM at 352 px, batch 32, bf16, channels_last, salnet's train_step on
   in-memory batches, eager and torch.compile: images/s, MFU against the GPU's dense bf16 peak
   (PEAK_BF16_TFLOPS below; the entry used is printed with its source), peak memory.
2. feed: the real loader (synthetic 400 px JPEG shards, every host core but one as a worker)
   feeding the eager step, with data.augment_on=worker and =device: images/s, the fraction of
   the time spent waiting for data, and the device side's augmentation time per batch.
3. metrics: SODMetrics on the GPU against PySODMetrics (`python -m salnet.bench metrics`): speed
   and the largest difference.
4. memory: ZeRO-2 against DDP (`python -m salnet.bench step`'s workers): per-rank memory held
   between steps and peak. ZeRO partitions across ranks: on one GPU nothing is partitioned and
   this shows DeepSpeed's own overhead; with 2+ GPUs every GPU takes part.

The parts run in that order, torch.compile last, each only if the time left (--budget-s) covers
its estimate; a skipped part is listed under "skipped". Targets: MFU >= 40% (compiled) and a data
wait below 5% with data.augment_on=device. Without CUDA it stops at once, saying so; its CPU
parts are exercised, at toy sizes, by tests/test_bench_gpu.py.
"""

from __future__ import annotations

import contextlib
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
ESTIMATE_S = {"step": 40, "feed": 60, "metrics": 60, "memory": 150, "compile": 180}
MODES = ("worker", "device")


def parse(argv: list[str]):
    p = parser("gpu", __doc__.split("\n\n")[0], repeats=3)
    p.add_argument("--backbone", default="resnet50")
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
    return p.parse_args(argv)


def peak_bf16(name: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOPS, source) of the GPU called `name`, or None if the table does not know it."""
    return next(((tflops, source) for pattern, tflops, source in PEAK_BF16_TFLOPS if re.search(pattern, name)), None)


def step_args(args, device: str):
    """The arguments salnet.bench.step's helpers take, for this run's model and sizes."""
    return step_bench.parse(step_bench.shape_argv(step_bench.shape_of(args, device=device)))


def train_flops_per_image(module: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward FLOPs x 3 (backward ~ 2x forward), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    # Two images: BatchNorm on the PPM's 1x1 bin needs more than one value per channel in train mode.
    with FlopCounterMode(display=False) as counter:
        module(torch.zeros(2, 3, size, size, device=device))
    return 3 * counter.get_total_flops() / 2


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure_step(args, device: str, compile: bool, peak_tflops: float | None) -> dict:
    """salnet's train_step on in-memory batches: images/s (median of repeats), MFU, peak memory."""
    from salnet import dist
    from salnet.model import build_model
    from salnet.run.runlog import peak_memory_mib

    sargs = step_args(args, device)
    cfg = step_bench.bench_config(sargs, ["train.compile=true"] if compile else [])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    _reset_peak(dist.device())
    step_fn, strategy, _ = step_bench.salnet_step_of(cfg, model)
    batches = step_bench.fake_batches(sargs, 4)
    if dist.device().type == "cuda":  # as the loader hands them over: pinned, so the copy is asynchronous
        batches = [{k: v.pin_memory() for k, v in batch.items()} for batch in batches]
    if compile:
        step_fn(batches[0])  # compiling takes a step or two; timed_steps warms up with one more
    seconds = statistics.median(step_bench.timed_steps(step_fn, batches, sargs.steps) for _ in range(args.repeats))
    img_s = args.batch / seconds
    flops = train_flops_per_image(strategy.module, args.size, dist.device())
    return {
        "img_s": round(img_s, 1),
        "train_gflops_per_image": round(flops / 1e9, 2),
        "mfu": round(img_s * flops / (peak_tflops * 1e12), 4) if peak_tflops else None,
        "peak_memory_mib": round(peak_memory_mib(), 1),
    }


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
        "backbone": args.backbone,
        "size": args.size,
        "batch": args.batch,
        "workers": args.workers,
        **machine(),
        "step": {},
        "feed": {},
        "skipped": [],
    }

    def due(part: str) -> bool:
        left = args.budget_s - (time.perf_counter() - started)
        if left < ESTIMATE_S[part]:
            report["skipped"].append(
                f"{part}: {left:.0f} s left of --budget-s {args.budget_s:.0f}, it needs ~{ESTIMATE_S[part]} s"
            )
            print(f"skipped {report['skipped'][-1]}", flush=True)
            return False
        return True

    if due("step"):
        report["step"]["eager"] = measure_step(args, "cuda", compile=False, peak_tflops=peak)
        print(f"step, eager: {report['step']['eager']}", flush=True)
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
    if due("compile"):
        report["step"]["compile"] = measure_step(args, "cuda", compile=True, peak_tflops=peak)
        print(f"step, torch.compile: {report['step']['compile']}", flush=True)

    mfu = max((run["mfu"] or 0 for run in report["step"].values()), default=None)
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
