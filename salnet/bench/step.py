"""`python -m salnet.bench step`: what salnet's training step costs over a bare PyTorch loop.

Three measurements, each against a baseline in the same run (medians of repeats):

1. overhead: salnet's `train_step` (strategy, non-finite agreement, clipping norm, schedule,
   device-side input adjustment) against a bare loop on an identical model, optimizer and the
   same in-memory uint8 batches, one process. Target: at most 3% slower.
2. scaling (CPU only): per-rank images/s of DDP on 2 ranks x 1 thread against 1 rank x 1 thread
   (real torchrun, gloo). Target: at least 0.85.
3. pipeline: the real loader from synthetic shards feeding `train_step`, giving end-to-end
   images/s, the fraction of time spent waiting for data and, on CUDA, model FLOPs utilisation.

On a GPU: `python -m salnet.bench step --device cuda` (352 px, bf16, channels_last, resnet50).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

# Dense bf16 peak of the GPUs we report MFU against (vendor datasheets, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m salnet.bench step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backbone", default=None, help="default: resnet18 on cpu, resnet50 on cuda")
    p.add_argument("--size", type=int, default=None, help="input px (default: 96 on cpu, 352 on cuda)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: 8 on cpu, 32 on cuda)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default: 5 on cpu, 30 on cuda)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one process of the scaling run
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
    return load_config(None, [f"model.backbone.name={args.backbone}", f"model.ppm_width={width}", f"model.fpn_width={width}",
                              f"data.size={args.size}", f"data.batch_size={args.batch}", "optim.lr=1e-4",
                              f"train.amp={'bf16' if args.device == 'cuda' else 'fp32'}", "train.channels_last=true", *extra])


def fake_batches(args, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g),
             "mask": (torch.rand(args.batch, 1, args.size, args.size, generator=g) > 0.5).to(torch.uint8) * 255}
            for _ in range(n)]


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


def salnet_and_bare_steps(cfg):
    """Two step functions on identical models: salnet's train_step, and the loop one writes by hand."""
    from salnet import dist
    from salnet.data import to_model_input, to_target
    from salnet.loss import build_loss
    from salnet.model import build_model
    from salnet.optim import build_optimizer
    from salnet.strategy import build_strategy
    from salnet.train import train_step

    torch.manual_seed(0)
    model = build_model(cfg.model)
    bare_model = copy.deepcopy(model).to(dist.device(), memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss)
    strategy = build_strategy(cfg, model, total_steps=10**6)
    losses: dict = {}

    def salnet_step(batch):
        train_step(strategy, loss_fn, [batch], cfg.train.channels_last, losses)

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
    salnet_s, bare_s = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        salnet_s.append(timed_steps(salnet_step, batches, args.steps))
        bare_s.append(timed_steps(bare_step, batches, args.steps))
    s, b = statistics.median(salnet_s), statistics.median(bare_s)
    return {"salnet_img_s": args.batch / s, "bare_img_s": args.batch / b, "overhead": s / b - 1}


def scaling_worker(args) -> None:
    """One rank of the scaling run: per-rank images/s through the real DDP strategy."""
    from salnet import dist

    with dist.distributed():
        cfg = bench_config(args)
        salnet_step, _, _, _ = salnet_and_bare_steps(cfg)
        batches = fake_batches(args, 4, seed=dist.rank())
        per_step = statistics.median(timed_steps(salnet_step, batches, args.steps) for _ in range(args.repeats))
        if dist.is_main():
            print(json.dumps({"world": dist.world_size(), "per_rank_img_s": args.batch / per_step}), flush=True)


def measure_scaling(args) -> dict:
    worker = ["-m", "salnet.bench", "step", "--worker", "--backbone", args.backbone, "--size", str(args.size),
              "--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for world in (1, 2):
        launcher = [] if world == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={world}",
                                          "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        out = subprocess.run([sys.executable, *launcher, *worker], env=env, text=True, capture_output=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"scaling run with {world} rank(s) failed:\n{out.stderr[-3000:]}")
        results[world] = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])["per_rank_img_s"]
    return {"one_rank_img_s": results[1], "two_ranks_per_rank_img_s": results[2], "per_rank_ratio": results[2] / results[1]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_pipeline(args) -> dict:
    """The real loader from synthetic shards into train_step: throughput, data wait, MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from salnet.data import TrainStream
    from salnet.shards.synth import synthesize
    from salnet.train import DataClock

    with tempfile.TemporaryDirectory() as tmp:
        n = args.batch * (args.steps + 1) * 2
        train_dir, val_dir = synthesize(tmp, train=n, val=1, size=args.size, seed=0, workers=os.cpu_count() or 1)
        cfg = bench_config(args, [f"data.train=[{train_dir}]", f"data.val=[{val_dir}]"])
        salnet_step, _, strategy, _ = salnet_and_bare_steps(cfg)
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
        # Two images: BatchNorm on the PPM's 1x1 bin needs more than one value per channel in train mode.
        x = torch.zeros(2, 3, args.size, args.size, device=next(strategy.module.parameters()).device)
        with FlopCounterMode(display=False) as counter:
            strategy.module(x)
        train_flops_per_image = 3 * counter.get_total_flops() / 2  # backward ~ 2x forward
    img_s = args.steps * args.batch / elapsed
    result = {"pipeline_img_s": img_s, "data_wait": (clock.waiting - waited) / elapsed,
              "train_gflops_per_image": train_flops_per_image / 1e9}
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result["gpu"] = name
        result["mfu"] = img_s * train_flops_per_image / (peak * 1e12) if peak else None
    return result


def main(argv):
    args = parse(argv)
    if args.worker:
        return scaling_worker(args)
    if args.device == "cpu":
        torch.set_num_threads(1)  # one process, one thread: the setting the targets are stated for
    from salnet import dist

    dist.init(use_cuda=args.device == "cuda")
    report = {"device": args.device, "backbone": args.backbone, "size": args.size, "batch": args.batch,
              "steps": args.steps, "repeats": args.repeats}
    report.update(measure_overhead(args))
    print(f"overhead: salnet {report['salnet_img_s']:.2f} img/s vs bare {report['bare_img_s']:.2f} img/s "
          f"-> {report['overhead']:+.1%} (target <= +3%)", flush=True)
    if args.device == "cpu":
        report.update(measure_scaling(args))
        print(f"scaling: 2 ranks x 1 thread {report['two_ranks_per_rank_img_s']:.2f} img/s per rank vs 1 rank "
              f"{report['one_rank_img_s']:.2f} -> {report['per_rank_ratio']:.2f} (target >= 0.85)", flush=True)
    report.update(measure_pipeline(args))
    print(f"pipeline: {report['pipeline_img_s']:.2f} img/s, data wait {report['data_wait']:.1%}"
          + (f", MFU {report['mfu']:.1%}" if report.get("mfu") else ""), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
