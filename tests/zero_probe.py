"""Run by test_deepspeed.py under torchrun: the same few training steps through several strategies.

usage: zero_probe.py OUT_DIR STEPS NAME:override,override ... (one NAME per strategy setting)

Every case starts from the same weights (seed 0) and trains STEPS optimizer steps of the real loop
step (salnet.trainer.train_step) on the same per-rank batches: resnet18 at 64 px from random uint8
images. Rank 0 then writes OUT_DIR/NAME/best.pt (strategy.fp32_state_dict() through save_best,
as training does) and OUT_DIR/NAME/engine.pt: the mean loss of every step, and the predictions of
the strategy's own eval model on a fixed batch. DeepSpeed cases then take one more step in which
rank 1's loss is infinite, and record what each rank was told and whether the weights moved.
"""

import sys
from pathlib import Path

import torch

from salnet import dist
from salnet.config import load_config
from salnet.data import TrainInput, to_model_input
from salnet.loss import build_loss
from salnet.model import build_model
from salnet.run.checkpoint import save_best
from salnet.strategy import build_strategy
from salnet.trainer import train_step

BASE = [
    "model.backbone.name=resnet18",
    "model.ppm_width=32",
    "model.fpn_width=32",
    "data.size=64",
    "data.batch_size=4",
    "optim.lr=1e-3",
    "optim.backbone_lr_mult=0.1",
    "optim.warmup_steps=2",
]


def uint8_batch(gen: torch.Generator, batch: int, size: int) -> dict:
    return {
        "image": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen),
        "mask": (torch.rand(batch, 1, size, size, generator=gen) > 0.5).to(torch.uint8) * 255,
    }


def infinite_on_rank_1(loss_fn):
    """The loss turns infinite on rank 1 while its gradients stay finite: only the loss says so."""

    def poisoned(outputs, target):
        total, parts = loss_fn(outputs, target)
        return total + (float("inf") if dist.rank() == 1 else 0.0), parts

    return poisoned


def run_case(cfg, steps: int, out: Path) -> None:
    torch.manual_seed(0)
    strategy = build_strategy(cfg, build_model(cfg.model), total_steps=steps + 1)
    loss_fn = build_loss(cfg.loss)
    gen = torch.Generator().manual_seed(100 + dist.rank())  # each rank its own batches, the same in every case
    losses = []
    for _ in range(steps):
        micro_batches = [uint8_batch(gen, cfg.data.batch_size, cfg.data.size) for _ in range(cfg.train.grad_accum)]
        result, step_losses = train_step(
            strategy, loss_fn, micro_batches, TrainInput(cfg.data, dist.device(), cfg.train.channels_last), stop=0
        )
        assert result.skipped is None, result
        losses.append(dist.all_reduce_scalar(float(step_losses["loss"]), "avg"))
    weights = strategy.fp32_state_dict()
    images = uint8_batch(torch.Generator().manual_seed(7), 2, cfg.data.size)["image"]
    predictions = strategy.predict(images).cpu()
    strategy.train()
    record = {
        "losses": losses,
        "images": to_model_input(images, dist.device(), cfg.train.channels_last).cpu(),
        "predictions": predictions,
    }
    if cfg.train.strategy == "deepspeed":
        result, _ = train_step(
            strategy,
            infinite_on_rank_1(loss_fn),
            [uint8_batch(gen, cfg.data.batch_size, cfg.data.size)],
            TrainInput(cfg.data, dist.device(), cfg.train.channels_last),
            stop=0,
        )
        after = strategy.fp32_state_dict()
        # Parameters only: the forward pass itself moved BatchNorm's running statistics, as under DDP.
        record["bad_step"] = {
            "skipped": dist.all_gather_object(str(result.skipped)),
            "parameters_unchanged": all(
                torch.equal(weights[k], after[k]) for k, _ in strategy.module.named_parameters()
            ),
        }
    if dist.is_main():
        save_best(out, weights, cfg.model_dump(mode="json"), {}, steps)
        torch.save(record, out / "engine.pt")


def main():
    out, steps, *cases = sys.argv[1:]
    with dist.distributed():
        for case in cases:
            name, _, overrides = case.partition(":")
            cfg = load_config(None, BASE + [f"out_dir={out}", f"name={name}"] + [o for o in overrides.split(",") if o])
            run_case(cfg, int(steps), cfg.run_dir)


if __name__ == "__main__":
    main()
