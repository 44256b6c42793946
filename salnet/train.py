"""The main job: `torchrun --nproc_per_node N -m salnet.train --config configs/X.yaml [key=value ...]`.

Also runs under srun/Submitit (Slurm variables, no torchrun) or as one plain process. The loop
reads like the pipeline it implements:

    prepare data -> build the network -> set the loss -> set the optimizer (strategy) -> resume
    -> iterate: adjust input, forward, loss, backward, optimizer step
       -> validate (all ranks) -> keep the best -> save
    -> until the configured steps (or epochs) are done
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Optional

import torch

from salnet import dist
from salnet.checkpoint import clear_run, rng_state, resume_path, save_best, save_checkpoint, set_rng_state
from salnet.config import Config, parse_config, save_config, to_yaml
from salnet.data import TrainStream, ValStream, to_model_input, to_target
from salnet.loss import build_loss
from salnet.metrics import SODMetrics
from salnet.model import build_model
from salnet.runlog import RunLog, format_metrics_table, format_train_line, peak_memory_mib
from salnet.strategy import StepResult, Strategy, build_strategy
from salnet.validate import validate

LOWER_IS_BETTER = {"MAE"}


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainState:
    """Everything the loop itself carries across a checkpoint (the strategy saves the rest)."""

    step: int = 0
    epoch: int = 0
    best: dict = field(default_factory=dict)  # {"metric", "value", "step"} once validated
    bad_streak: int = 0
    skipped_steps: int = 0
    wandb_id: Optional[str] = None


def is_better(metric: str, value: float, best: dict) -> bool:
    if not best:
        return True
    return value < best["value"] if metric in LOWER_IS_BETTER else value > best["value"]


def grouped(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Micro-batches in groups of `size` (one optimizer step each); an incomplete tail is dropped."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


class DataClock:
    """Measures how much of the wall time the loop spends waiting for the next batch."""

    def __init__(self):
        self.waiting = 0.0

    def timed(self, batches: Iterable[dict]) -> Iterator[dict]:
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waiting += time.perf_counter() - start
            yield batch


def train_step(strategy: Strategy, loss_fn, micro_batches: list[dict], channels_last: bool, losses: dict) -> StepResult:
    """One optimizer step over `micro_batches`; adds each loss component's mean to `losses`."""
    device = dist.device()
    for i, batch in enumerate(micro_batches):
        # adjust input: to the device, float, normalised, channels_last
        image = to_model_input(batch["image"], device, channels_last)
        target = to_target(batch["mask"], device)
        # forward, loss, backward (gradients are reduced across ranks on the last micro-batch)
        loss, parts = strategy.forward_backward(image, target, loss_fn, sync=i == len(micro_batches) - 1)
        for name, value in {"loss": loss, **parts}.items():  # kept on the device: no sync per micro-step
            losses[name] = losses.get(name, 0.0) + value.detach() / len(micro_batches)
    # optimizer step (skipped on every rank together if anything was non-finite)
    return strategy.optimizer_step()


def total_steps_of(cfg: Config, steps_per_epoch: int) -> int:
    if (cfg.train.steps is None) == (cfg.train.epochs is None):
        raise ValueError("set exactly one of train.steps and train.epochs "
                         f"(got steps={cfg.train.steps}, epochs={cfg.train.epochs})")
    return cfg.train.steps or cfg.train.epochs * steps_per_epoch


def train(cfg: Config) -> dict:
    rank, world = dist.rank(), dist.world_size()
    device = dist.device()
    run_dir = cfg.run_dir

    # ---- prepare data --------------------------------------------------------------------
    train_data = TrainStream(cfg.data, seed=cfg.train.seed, rank=rank, world_size=world)
    steps_per_epoch = train_data.steps_per_epoch // cfg.train.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch has {train_data.steps_per_epoch} micro-batches per rank, fewer than "
                         f"train.grad_accum={cfg.train.grad_accum}: lower data.batch_size or train.grad_accum")
    total_steps = total_steps_of(cfg, steps_per_epoch)

    # ---- build the network (same initial weights on every rank) -------------------------
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)

    # ---- set the loss ---------------------------------------------------------------------
    loss_fn = build_loss(cfg.loss)

    # ---- set the optimizer and schedule (inside the strategy: DDP or DeepSpeed) ----------
    strategy = build_strategy(cfg, model, total_steps)
    val_data = ValStream(cfg.data, rank=rank, world_size=world, pad_to_equal=strategy.needs_equal_forward_passes)
    metrics = SODMetrics(cfg.eval.metrics, device=device)

    # ---- resume, if there is a checkpoint to resume from ----------------------------------
    state = TrainState()
    if cfg.train.resume == "none" and dist.is_main():
        for removed in clear_run(run_dir):
            print(f"train.resume=none: removed {removed} of an earlier run", flush=True)
    dist.barrier()
    checkpoint = resume_path(run_dir, cfg.train.resume)
    if checkpoint is not None:
        client = strategy.load(checkpoint)
        state = TrainState(**client["train"])
        if client["world_size"] == world:
            train_data.load_state_dict(client["loader"][rank])
            set_rng_state(client["rng"][rank])
        else:
            # Per-rank loader positions and RNG streams do not map onto another world size.
            dist.print0(f"resume: world size changed ({client['world_size']} -> {world}); the data order "
                        f"restarts at the next epoch boundary and RNG streams are re-seeded")
            state.epoch += 1
            dist.seed_everything(cfg.train.seed + state.step)
    else:
        dist.seed_everything(cfg.train.seed)

    log = RunLog(cfg, resumed_step=state.step, wandb_id=state.wandb_id)
    state.wandb_id = log.wandb_id
    if dist.is_main():
        log.print(to_yaml(cfg))
        save_config(cfg, run_dir / "config.yaml")
    log.print(f"salnet: {world} rank(s) on {device.type} ({dist.backend() or 'single process'}), "
              f"global batch {world * cfg.data.batch_size * cfg.train.grad_accum} = {world} ranks x "
              f"{cfg.data.batch_size} micro-batch x {cfg.train.grad_accum} accumulation; "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps"
              + (f"; resumed from {checkpoint} at step {state.step}" if checkpoint else ""))

    def save(at_step: int) -> None:
        client = {"train": asdict(state), "world_size": world,
                  "loader": dist.all_gather_object(train_data.state_dict()),
                  "rng": dist.all_gather_object(rng_state())}
        save_checkpoint(run_dir, at_step, strategy, client, keep=cfg.checkpoint.keep)

    if state.step >= total_steps:
        log.print(f"nothing to do: the run is complete at step {state.step} (train.steps={total_steps}); "
                  f"best {state.best.get('metric')}={state.best.get('value')} at step {state.best.get('step')}; "
                  f"set train.resume=none to start over or raise train.steps to continue")

    # ---- iterate --------------------------------------------------------------------------
    clock = DataClock()
    window = {"start": time.perf_counter(), "wait": 0.0, "steps": 0, "losses": {}}
    strategy.model.train()
    while state.step < total_steps:
        for micro_batches in grouped(clock.timed(train_data.epoch_batches(state.epoch)), cfg.train.grad_accum):
            result = train_step(strategy, loss_fn, micro_batches, cfg.train.channels_last, window["losses"])
            state.step += 1
            window["steps"] += 1
            if result.skipped:
                state.skipped_steps += 1
                state.bad_streak = state.bad_streak + 1 if "non-finite" in result.skipped else 0
                log.print(f"step {state.step}: skipped ({result.skipped})")
                if state.bad_streak >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"{state.bad_streak} consecutive steps skipped ({result.skipped}) at step {state.step} "
                        f"(train.max_bad_steps={cfg.train.max_bad_steps}); the last good checkpoint is the newest "
                        f"under {run_dir / 'checkpoints'}; lower optim.lr or set optim.grad_clip")
            else:
                state.bad_streak = 0

            if state.step % cfg.log.every == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window["start"]
                values = {
                    "epoch": state.epoch,
                    "losses": {k: dist.all_reduce_scalar(float(v) / window["steps"], "avg") for k, v in window["losses"].items()},
                    "lr": strategy.lr(),
                    "grad_norm": result.grad_norm,
                    "images_per_s": window["steps"] * world * cfg.data.batch_size * cfg.train.grad_accum / elapsed,
                    "data_wait": (clock.waiting - window["wait"]) / elapsed,
                    "peak_mem_mib": peak_memory_mib(),
                    "skipped_steps": state.skipped_steps,
                }
                log.print(format_train_line(state.step, total_steps, state.epoch, values))
                log.record("train", state.step, {**{k: v for k, v in values.items() if k != "losses"}, **values["losses"]})
                window = {"start": time.perf_counter(), "wait": clock.waiting, "steps": 0, "losses": {}}

            # validate on every rank, then keep the best (before saving, so the checkpoint knows it)
            if state.step % cfg.eval.every == 0 or state.step == total_steps:
                scores = validate(strategy.eval_model, val_data, metrics, strategy.autocast, cfg.train.channels_last)
                metric = cfg.eval.best_metric
                if metric not in scores:
                    raise ValueError(f"eval.best_metric={metric!r} is not computed by eval.metrics={cfg.eval.metrics}")
                if is_better(metric, scores[metric], state.best):
                    state.best = {"metric": metric, "value": scores[metric], "step": state.step}
                    weights = strategy.fp32_state_dict()
                    if dist.is_main():
                        save_best(run_dir, weights, cfg.model_dump(mode="json"), scores, state.step)
                log.print(format_metrics_table(state.step, scores, state.best))
                log.record("val", state.step, {**scores, "images": metrics.num_images})
                strategy.model.train()

            # save the full training state, but not in the middle of a streak of skipped steps: the
            # newest checkpoint stays the last one whose step went through
            if (state.step % cfg.checkpoint.every == 0 or state.step == total_steps) and state.bad_streak == 0:
                save(state.step)
            if state.step >= total_steps:
                break
        else:
            state.epoch += 1  # the epoch's batches ran out before the step budget
    log.close()
    return {"step": state.step, "best": state.best, "skipped_steps": state.skipped_steps}


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_config(argv, prog="python -m salnet.train", description=__doc__.split("\n\n")[0])
    with dist.distributed(timeout_s=cfg.train.timeout_s):
        try:
            summary = train(cfg)
        except Exception as e:
            # Errors name their rank: in a multi-rank job the first failure is what matters.
            print(f"[rank {dist.rank()}] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            traceback.print_exc()
            sys.exit(1)
        if summary["best"]:
            dist.print0(f"done: {summary['step']} steps; best {summary['best']['metric']}="
                        f"{summary['best']['value']:.4f} at step {summary['best']['step']} -> {cfg.run_dir / 'best.pt'}")


if __name__ == "__main__":
    main()
