"""`python -m salnet.bench step`: what salnet's training step costs over a bare PyTorch loop.

Three measurements, each against a baseline in the same run (medians of repeats):

1. overhead: salnet's `train_step` (strategy, non-finite agreement, clipping norm, schedule,
   device-side input adjustment) against a bare loop on an identical model, optimizer and the
   same in-memory uint8 batches, one process. Target: at most 3% slower.
2. scaling (CPU only): per-rank images/s of DDP on 2 ranks x 1 thread against 1 rank x 1 thread
   (real torchrun, gloo). Target: at least 0.85.
3. pipeline: the real loader from synthetic shards feeding `train_step`, giving end-to-end
   images/s, the fraction of time spent waiting for data and, on CUDA, model FLOPs utilisation.

`--strategy deepspeed` measures instead what ZeRO buys: DDP, ZeRO-1, ZeRO-2 and ZeRO-3 on 2 ranks
x 1 thread (CPU; on CUDA every visible GPU), each in its own torchrun so each has its own
high-water mark: per-rank images/s and, per rank (the larger of the ranks), memory counted from
just before the strategy is built: `held_mib`, the tensors held after the timed steps (what stays
between steps: weights, gradients, optimizer states, communication buffers: what ZeRO partitions),
and `peak_growth_mib`, the rise of the high-water mark (adds activations, transient copies at
set-up and, on CPU, what the allocator keeps). Held is counted tensor by tensor on CPU (tensors
Python can reach: DDP's C++ reducer buckets, one more gradient copy, are not, which favours DDP)
and by the CUDA allocator on GPUs; the peak is the process's peak RSS on CPU, the allocator's on GPUs.

On a GPU: `python -m salnet.bench step --device cuda` (352 px, bf16, channels_last, resnet50).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from salnet.bench._harness import emit, interleaved, medians, parser

# Dense bf16 peak of the GPUs we report MFU against (vendor datasheets, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def parse(argv):
    p = parser("step", __doc__.split("\n\n")[0], repeats=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backbone", default=None, help="default: resnet18 on cpu, resnet50 on cuda")
    p.add_argument("--size", type=int, default=None, help="input px (default: 96 on cpu, 352 on cuda)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: 8 on cpu, 32 on cuda)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default: 5 on cpu, 30 on cuda)")
    p.add_argument(
        "--strategy",
        choices=["ddp", "deepspeed"],
        default="ddp",
        help="ddp: overhead, scaling and pipeline (the default); deepspeed: DDP against ZeRO-1/2/3",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one process of a multi-process run
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # config overrides of a worker
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    args.size = args.size or (352 if cuda else 96)
    args.batch = args.batch or (32 if cuda else 8)
    args.steps = args.steps or (30 if cuda else 5)
    return args


def bench_config(args, extra=()):
    from salnet.config import load_config

    width = 256 if args.backbone != "resnet18" else 64
    return load_config(
        None,
        [
            f"model.backbone.name={args.backbone}",
            f"model.ppm_width={width}",
            f"model.fpn_width={width}",
            f"data.size={args.size}",
            f"data.batch_size={args.batch}",
            "optim.lr=1e-4",
            f"train.amp={'bf16' if args.device == 'cuda' else 'fp32'}",
            "train.channels_last=true",
            *extra,
        ],
    )


def fake_batches(args, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g),
            "mask": (torch.rand(args.batch, 1, args.size, args.size, generator=g) > 0.5).to(torch.uint8) * 255,
        }
        for _ in range(n)
    ]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(step_fn, batches, steps) -> float:
    """Seconds per step over `steps` steps (after one untimed warm-up step)."""
    step_fn(batches[0])
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step_fn(batches[i % len(batches)])
    sync()
    return (time.perf_counter() - start) / steps


def salnet_step_of(cfg, model):
    """salnet's train_step on `model` through the configured strategy."""
    from salnet import dist
    from salnet.data import TrainInput
    from salnet.loss import build_loss
    from salnet.strategy import build_strategy
    from salnet.trainer import train_step

    loss_fn = build_loss(cfg.loss)
    strategy = build_strategy(cfg, model, total_steps=10**6)
    adjust_input = TrainInput(cfg.data, dist.device(), cfg.train.channels_last)

    def salnet_step(batch):
        train_step(strategy, loss_fn, [batch], adjust_input, stop=0)

    return salnet_step, strategy, loss_fn


def salnet_and_bare_steps(cfg):
    """Two step functions on identical models: salnet's train_step, and the loop one writes by hand."""
    from salnet import dist
    from salnet.data import to_model_input, to_target
    from salnet.model import build_model
    from salnet.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(cfg.model)
    bare_model = copy.deepcopy(model).to(dist.device(), memory_format=torch.channels_last)
    salnet_step, strategy, loss_fn = salnet_step_of(cfg, model)
    bare_opt = build_optimizer(bare_model, cfg.optim)
    amp = strategy.autocast

    def bare_step(batch):
        image = to_model_input(batch["image"], dist.device(), True)
        target = to_target(batch["mask"], dist.device())
        with amp():
            out = bare_model(image)
        loss, _ = loss_fn(out, target)
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    return salnet_step, bare_step, strategy, loss_fn


def measure_overhead(args) -> dict:
    cfg = bench_config(args)
    salnet_step, bare_step, _, _ = salnet_and_bare_steps(cfg)
    batches = fake_batches(args, 4)
    seconds = medians(
        interleaved(
            args.repeats,
            {
                "salnet": lambda _: timed_steps(salnet_step, batches, args.steps),
                "bare": lambda _: timed_steps(bare_step, batches, args.steps),
            },
        )
    )
    s, b = seconds["salnet"], seconds["bare"]
    return {"salnet_img_s": args.batch / s, "bare_img_s": args.batch / b, "overhead": s / b - 1}


def tensor_memory_mib() -> float:
    """Bytes of the tensors this rank holds now: the CUDA allocator's count on GPU; on CPU every
    tensor storage the process can reach, each once (the resident set would also count what
    glibc keeps of freed blocks, which says more about the allocator than about the strategy)."""
    from salnet import dist

    if dist.device().type == "cuda":
        return torch.cuda.memory_allocated(dist.device()) / 2**20
    storages = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch.distributed aliases warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type == "cpu"]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values()) / 2**20


def worker(args) -> None:
    """One rank of a multi-process run: per-rank images/s and memory through the configured strategy."""
    from salnet import dist
    from salnet.model import build_model
    from salnet.run.runlog import peak_memory_mib

    with dist.distributed(use_cuda=args.device == "cuda"), tempfile.TemporaryDirectory() as run_dirs:
        cfg = bench_config(
            args, [*args.set, f"out_dir={run_dirs}"]
        )  # what a strategy writes (DeepSpeed's JSON) goes there
        if cfg.train.strategy == "deepspeed":
            import salnet.strategy.zero  # noqa: F401  (DeepSpeed's own import belongs to the baseline, not to ZeRO)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        baseline_tensors, baseline_peak = tensor_memory_mib(), peak_memory_mib()
        salnet_step, _, _ = salnet_step_of(cfg, model)
        batches = fake_batches(args, 4, seed=dist.rank())
        per_step = statistics.median(timed_steps(salnet_step, batches, args.steps) for _ in range(args.repeats))
        held, peak = tensor_memory_mib() - baseline_tensors, peak_memory_mib() - baseline_peak
        result = {
            "world": dist.world_size(),
            "per_rank_img_s": args.batch / per_step,
            "held_mib": dist.all_reduce_scalar(held, "max"),
            "peak_growth_mib": dist.all_reduce_scalar(peak, "max"),
        }
        if dist.is_main():
            emit(result)  # the line run_workers reads


SHAPE = ("device", "backbone", "size", "batch", "steps", "repeats")  # what fixes a measurement


def shape_of(args, **overrides) -> dict:
    """The flags that fix what a measurement runs (device, model, sizes, steps), from parsed `args`."""
    return {name: overrides[name] if name in overrides else getattr(args, name) for name in SHAPE}


def shape_argv(shape: dict) -> list[str]:
    """`shape_of`'s dict as this tool's command-line flags."""
    return [item for name, value in shape.items() for item in (f"--{name}", str(value))]


def run_workers(args, world: int, overrides=()) -> dict:
    """`world` worker processes (torchrun unless 1) with config `overrides`; rank 0's JSON result."""
    from salnet import dist

    command = [
        "-m",
        "salnet.bench",
        "step",
        "--worker",
        *shape_argv(shape_of(args)),
        *(f"--set={o}" for o in overrides),
    ]
    launcher = (
        []
        if world == 1
        else [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world}",
            "--master_addr=127.0.0.1",
            f"--master_port={dist.free_port()}",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *launcher, *command], env=env, text=True, capture_output=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"run with {world} rank(s) and {list(overrides)} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def measure_scaling(args) -> dict:
    results = {world: run_workers(args, world)["per_rank_img_s"] for world in (1, 2)}
    return {
        "one_rank_img_s": results[1],
        "two_ranks_per_rank_img_s": results[2],
        "per_rank_ratio": results[2] / results[1],
    }


ZERO_RUNS = {
    "ddp": [],
    **{f"zero{stage}": ["train.strategy=deepspeed", f"train.zero_stage={stage}"] for stage in (1, 2, 3)},
}


def measure_zero(args) -> dict:
    world = 2 if args.device == "cpu" else torch.cuda.device_count()
    if world < 2:
        raise SystemExit(
            f"--strategy deepspeed compares partitioning across ranks: it needs 2 or more GPUs, found {world}"
        )
    runs = {name: run_workers(args, world, overrides) for name, overrides in ZERO_RUNS.items()}
    ddp = runs["ddp"]
    for name, run in runs.items():
        run["img_s_vs_ddp"] = run["per_rank_img_s"] / ddp["per_rank_img_s"]
        run["held_vs_ddp"] = run["held_mib"] / ddp["held_mib"]
        print(
            f"{name:>5}: {run['per_rank_img_s']:6.2f} img/s per rank ({run['img_s_vs_ddp']:.2f}x DDP); per rank "
            f"{run['held_mib']:.0f} MiB held between steps ({run['held_vs_ddp']:.2f}x DDP), "
            f"peak {run['peak_growth_mib']:.0f} MiB",
            flush=True,
        )
    return {"world": world, "runs": runs}


def measure_pipeline(args) -> dict:
    """The real loader from synthetic shards into train_step: throughput, data wait, MFU."""
    from salnet.data import TrainStream
    from salnet.model.cost import meta_model, train_flops_per_image
    from salnet.run.runlog import DataClock
    from salnet.shards.parallel import available_cpus
    from salnet.shards.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        n = args.batch * (args.steps + 1) * 2
        train_dir, val_dir = synthesize(tmp, train=n, val=1, size=args.size, seed=0, workers=available_cpus())
        cfg = bench_config(args, [f"data.train=[{train_dir}]", f"data.val=[{val_dir}]"])
        salnet_step, _, _, _ = salnet_and_bare_steps(cfg)
        stream = TrainStream(cfg.data, seed=0, rank=0, world_size=1)
        clock = DataClock()
        batches = clock.timed(stream.epoch_batches(0))
        salnet_step(next(batches))  # warm-up, workers started
        sync()
        waited, start = clock.waiting, time.perf_counter()
        for _, batch in zip(range(args.steps), batches):
            salnet_step(batch)
        sync()
        elapsed = time.perf_counter() - start
    train_flops = train_flops_per_image(meta_model(cfg.model), args.size, args.size)
    img_s = args.steps * args.batch / elapsed
    result = {
        "pipeline_img_s": img_s,
        "data_wait": (clock.waiting - waited) / elapsed,
        "train_gflops_per_image": train_flops / 1e9,
    }
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result["gpu"] = name
        result["mfu"] = img_s * train_flops / (peak * 1e12) if peak else None
    return result


def main(argv):
    args = parse(argv)
    if args.worker:
        return worker(args)
    if args.device == "cpu":
        torch.set_num_threads(1)  # one process, one thread: the setting the targets are stated for
    from salnet import dist

    dist.init(use_cuda=args.device == "cuda")
    report = {**shape_of(args), "strategy": args.strategy}
    if args.strategy == "deepspeed":
        report.update(measure_zero(args))
        emit(report)
        return
    report.update(measure_overhead(args))
    print(
        f"overhead: salnet {report['salnet_img_s']:.2f} img/s vs bare {report['bare_img_s']:.2f} img/s "
        f"-> {report['overhead']:+.1%} (target <= +3%)",
        flush=True,
    )
    if args.device == "cpu":
        report.update(measure_scaling(args))
        print(
            f"scaling: 2 ranks x 1 thread {report['two_ranks_per_rank_img_s']:.2f} img/s per rank vs 1 rank "
            f"{report['one_rank_img_s']:.2f} -> {report['per_rank_ratio']:.2f} (target >= 0.85)",
            flush=True,
        )
    report.update(measure_pipeline(args))
    print(
        f"pipeline: {report['pipeline_img_s']:.2f} img/s, data wait {report['data_wait']:.1%}"
        + (f", MFU {report['mfu']:.1%}" if report.get("mfu") else ""),
        flush=True,
    )
    emit(report)


if __name__ == "__main__":
    main(sys.argv[1:])
