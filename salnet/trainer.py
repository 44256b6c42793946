"""The training loop behind `python -m salnet.train` (salnet/train.py, the entry point). It reads
like the pipeline it implements:

    prepare data -> build the network -> set the loss -> set the optimizer (strategy) -> resume
    -> iterate: adjust input, forward, loss, backward, optimizer step
       -> validate (all ranks) -> keep the best -> save
    -> until the configured steps (or epochs) are done, or a preemption signal: then save and exit
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from salnet import dist
from salnet.config import Config, ConfigError, resume_changes, save_config, to_yaml
from salnet.data import TrainBatch, TrainInput, TrainStream
from salnet.loss import build_loss, check_side_weights
from salnet.metrics import is_better
from salnet.model import build_model, side_logits_in_training
from salnet.optim import apply_settings
from salnet.run.checkpoint import (
    ClientState,
    checkpoint_config,
    choose_checkpoint,
    load_checkpoint,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from salnet.run.preemption import StopRequest
from salnet.run.rundir import RunDir, RunLock, free_bytes, tree_bytes
from salnet.run.runlog import DataClock, LogWindow, RunLog, format_metrics_table, format_train_line
from salnet.run.state import Best, TrainState
from salnet.strategy import StepResult, Strategy, build_strategy
from salnet.validate import NonFinitePredictions, Validator


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainResult:
    """How `train()` ended."""

    step: int  # the last step taken
    best: Best | None  # the best validation (None if there was none)
    skipped_steps: int
    stopped: int  # the exit code the ranks agreed on after a stop signal (75 or 76), 0 if not stopped


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (log, validate, save) falls on `step`: every N steps and at the end."""
    return step % every == 0 or step == total


def grouped(batches: Iterable[TrainBatch], size: int) -> Iterator[list[TrainBatch]]:
    """Micro-batches in groups of `size` (one optimizer step each); an incomplete tail is dropped."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def step_batches(
    train_data: TrainStream, state: TrainState, total_steps: int, grad_accum: int, clock: DataClock
) -> Iterator[list[TrainBatch]]:
    """The micro-batches of each remaining optimizer step, epoch after epoch, until `total_steps`."""
    while state.step < total_steps:
        for group in grouped(clock.timed(train_data.epoch_batches(state.epoch)), grad_accum):
            yield group  # the loop takes the step before this generator resumes
            if state.step >= total_steps:
                return
        state.epoch += 1  # the epoch's batches ran out before the step budget


def train_step(
    strategy: Strategy, loss_fn, micro_batches: list[TrainBatch], adjust_input: TrainInput, stop: int
) -> tuple[StepResult, dict[str, torch.Tensor]]:
    """One optimizer step over `micro_batches`: the result, and each loss component's mean (on the device)."""
    losses: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        # adjust input: to the device, float, normalised, channels_last
        image, target = adjust_input(batch)
        # forward, loss, backward (gradients are reduced across ranks on the last micro-batch)
        loss, parts = strategy.forward_backward(image, target, loss_fn, sync=i == len(micro_batches) - 1)
        for name, value in {"loss": loss, **parts}.items():  # kept on the device: no sync per micro-step
            losses[name] = losses.get(name, 0.0) + value.detach() / len(micro_batches)
    # optimizer step (skipped on every rank together if anything was non-finite; a stop request is agreed on)
    return strategy.optimizer_step(stop=stop), losses


def total_steps_of(cfg: Config, steps_per_epoch: int) -> int:
    if (cfg.train.steps is None) == (cfg.train.epochs is None):
        raise ValueError(
            f"set exactly one of train.steps and train.epochs (got steps={cfg.train.steps}, epochs={cfg.train.epochs})"
        )
    return cfg.train.steps or cfg.train.epochs * steps_per_epoch


class Trainer:
    """The run's parts, built in pipeline order; `train()` below is the loop over them."""

    def __init__(self, cfg: Config):
        self.cfg, self.run_dir, self.world = cfg, RunDir(cfg.run_dir), dist.world_size()
        self.lock = RunLock(self.run_dir)
        # ---- prepare data ------------------------------------------------------------------
        self.train_data = TrainStream(cfg.data, seed=cfg.train.seed, rank=dist.rank(), world_size=self.world)
        self.adjust_input = TrainInput(
            cfg.data, dist.device(), cfg.train.channels_last, seed=cfg.train.seed, rank=dist.rank()
        )
        self.steps_per_epoch = self.train_data.steps_per_epoch // cfg.train.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has {self.train_data.steps_per_epoch} micro-batches per rank, fewer than "
                f"train.grad_accum={cfg.train.grad_accum}: lower data.batch_size or train.grad_accum"
            )
        self.total_steps = total_steps_of(cfg, self.steps_per_epoch)
        # ---- build the network (same initial weights on every rank) ------------------------
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        # ---- set the loss --------------------------------------------------------------------
        self.loss_fn = build_loss(cfg.loss)
        network = f"model.factory={cfg.model.factory!r}" if cfg.model.factory else "salnet's FPN + PPM"
        check_side_weights(cfg.loss, side_logits_in_training(model), network)
        # ---- set the optimizer and schedule (inside the strategy: DDP or DeepSpeed) ---------
        self.strategy = build_strategy(cfg, model, self.total_steps)
        # ---- the validator: every named val set, scored on every rank ------------------------
        self.validator = Validator(
            cfg, rank=dist.rank(), world_size=self.world, pad_to_equal=self.strategy.needs_equal_forward_passes
        )

    def start_or_resume(self) -> tuple[TrainState, Path | None]:
        """The loop state: fresh, or restored from a checkpoint with the loader position and RNG streams."""
        cfg = self.cfg
        if dist.is_main():
            self.lock.acquire()  # one writer per run directory, for this process's life
            for removed in self.run_dir.remove_leftovers():
                print(f"removed {removed}, left behind by an interrupted write", flush=True)
            if cfg.train.resume == "none":
                for removed in self.run_dir.start_over():
                    print(f"train.resume=none: removed {removed} of an earlier run", flush=True)
        dist.barrier()
        checkpoint = choose_checkpoint(self.run_dir, cfg.train.resume)
        if checkpoint is None:
            dist.seed_everything(cfg.train.seed)
            return TrainState(), None
        optim_changed = self.check_config_changes(
            checkpoint_config(checkpoint), checkpoint
        )  # before loading: a changed model would not load
        client = load_checkpoint(checkpoint, self.strategy)
        if optim_changed:  # the checkpoint brought back the old learning rates: the config's win
            apply_settings(self.strategy.schedule, self.cfg.optim)
        state = client.train
        state.saved_step = state.step
        if state.best is not None and state.best.metric != cfg.eval.best_metric:
            dist.print0(
                f"resume: eval.best_metric changed ({state.best.metric} -> {cfg.eval.best_metric}); the best so far "
                f"({state.best.metric}={state.best.value:.4f} at step {state.best.step}) does not compare with it, so "
                f"the next validation starts the best by {cfg.eval.best_metric} and replaces best.pt"
            )
        if client.world_size == self.world:
            self.train_data.load_state_dict(client.loader[dist.rank()])
            self.adjust_input.load_state_dict(client.inputs[dist.rank()] if client.inputs else {})
            set_rng_state(client.rng[dist.rank()])
        else:
            # Per-rank loader positions and RNG streams do not map onto another world size.
            dist.print0(
                f"resume: world size changed ({client.world_size} -> {self.world}); the data order "
                f"restarts at the next epoch boundary and RNG streams are re-seeded"
            )
            state.epoch += 1
            dist.seed_everything(cfg.train.seed + state.step)
        return state, checkpoint

    def check_config_changes(self, saved: dict | None, checkpoint: Path) -> bool:
        """Resume means what the config says: changed settings that may change take effect (and are
        listed); a change that would make it another run is an error listing them all. Returns
        whether optimizer settings changed (they must be re-applied after loading)."""
        allowed, breaking = resume_changes(saved, self.cfg) if saved else ([], [])
        if breaking:
            raise ConfigError(
                f"cannot resume {checkpoint} with this config: it changes settings the checkpoint belongs to:\n  "
                + "\n  ".join(breaking)
                + f"\nstart a new run instead (another name=, or train.resume=none to "
                f"start {self.run_dir} over), or undo these changes"
            )
        if allowed:
            dist.print0("resume: changed settings that take effect from here on:\n  " + "\n  ".join(allowed))
        return any(line.startswith("optim.") for line in allowed)

    def validate_and_keep_best(self, state: TrainState, log: RunLog) -> None:
        """Validate on every rank; a better value replaces best.pt (before saving, so the checkpoint knows it)."""
        try:
            scores = self.validator(self.strategy.predict)
        except NonFinitePredictions as e:
            newest = state.saved_step if state.saved_step is not None else "none yet"
            raise TrainingDiverged(
                f"validation at step {state.step}: {e}; the network has diverged (the newest good checkpoint "
                f"is step {newest} under {self.run_dir.checkpoints}); lower optim.lr or set optim.grad_clip"
            ) from None
        improved = state.offer_best(self.cfg.eval.best_metric, self.validator.best_value(scores), is_better)
        if improved:
            weights = self.strategy.fp32_state_dict()
            if dist.is_main():
                save_best(self.run_dir, weights, self.cfg.model_dump(mode="json"), scores, state.step)
        log.print(format_metrics_table(state.step, scores, state.best))
        # scores, curves, pictures and the best so far: metrics.jsonl, W&B, runs/NAME/plots/
        log.validation(state.step, scores, self.validator.last_details, state.best, improved)
        self.strategy.train()

    def save(self, state: TrainState) -> None:
        """The full training state at this step: every rank's part, written atomically."""
        client = ClientState.gather(state, self.train_data.state_dict(), self.adjust_input.state_dict())
        save_checkpoint(
            self.run_dir,
            state.step,
            self.strategy,
            client,
            keep=self.cfg.checkpoint.keep,
            config=self.cfg.model_dump(mode="json"),
        )
        state.saved_step = state.step

    def count_skip(self, state: TrainState, result: StepResult, log: RunLog) -> None:
        """Track skipped steps; a streak of diverging ones longer than train.max_bad_steps stops the run."""
        if result.skipped is None:
            state.bad_streak = 0
            return
        state.skipped_steps += 1
        state.bad_streak = state.bad_streak + 1 if result.skipped.diverging else 0
        log.print(f"step {state.step}: skipped ({result.skipped})")
        if state.bad_streak >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{state.bad_streak} consecutive steps skipped ({result.skipped}) at step {state.step} "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); the last good checkpoint is the newest "
                f"under {self.run_dir.checkpoints}; lower optim.lr or set optim.grad_clip"
            )

    def announce(self, state: TrainState, checkpoint: Path | None, log: RunLog) -> None:
        cfg, world = self.cfg, self.world
        if dist.is_main():
            log.print(to_yaml(cfg))
            save_config(cfg, self.run_dir.config)
        log.print(
            f"salnet: {world} rank(s) on {dist.device().type} ({dist.backend() or 'single process'}), "
            f"global batch {cfg.global_batch(world)} = {world} ranks x {cfg.data.batch_size} micro-batch x "
            f"{cfg.train.grad_accum} accumulation; {self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
            + (f"; resumed from {checkpoint} at step {state.step}" if checkpoint else "")
        )
        if dist.is_main():
            self.warn_if_disk_is_short(checkpoint)
        if state.step >= self.total_steps:
            best = state.best
            log.print(
                f"nothing to do: the run is complete at step {state.step} (train.steps={self.total_steps}); "
                + (f"best {best.metric}={best.value} at step {best.step}; " if best else "no validation; ")
                + "set train.resume=none to start over or raise train.steps to continue"
            )

    def warn_if_disk_is_short(self, checkpoint: Path | None) -> None:
        """Warn at start-up when the run's filesystem cannot hold checkpoint.keep + 1 checkpoints."""
        if checkpoint is not None:
            size = tree_bytes(checkpoint)
        else:  # weights + two optimizer moments, a rough lower bound (ZeRO-3 keeps its full sizes in ds_numel)
            size = 3 * sum(
                getattr(p, "ds_numel", p.numel()) * p.element_size() for p in self.strategy.module.parameters()
            )
        needed, free = size * (self.cfg.checkpoint.keep + 1), free_bytes(self.run_dir)
        if free < needed:
            logging.getLogger("salnet").warning(
                f"{self.run_dir} has {free / 2**30:.2f} GiB free, less than checkpoint.keep + 1 = {self.cfg.checkpoint.keep + 1} "
                f"checkpoints of about {size / 2**30:.2f} GiB need: a save will fail when the disk is full"
            )


def train(cfg: Config, stop: StopRequest | None = None) -> TrainResult:
    """Run the job to `train.steps`, or until `stop` is requested on any rank (then save and return)."""
    stop = stop or StopRequest()
    trainer = Trainer(cfg)
    strategy, total, every = trainer.strategy, trainer.total_steps, cfg.log.every
    state, checkpoint = trainer.start_or_resume()
    log = RunLog(cfg, resumed_step=state.step, wandb_id=state.wandb_id, world_size=trainer.world)
    state.wandb_id = log.wandb_id
    trainer.announce(state, checkpoint, log)

    clock = DataClock()
    window = LogWindow(
        clock,
        images_per_step=cfg.global_batch(trainer.world),
        total_steps=total,
        start_step=state.step,
        bar=log.progress(total, state.step),
    )
    stopped = 0  # once a rank is signalled: the exit code every rank agreed on
    stop.defer()  # from here a stop signal waits for the step's agreement and a save (until now: exit at once)
    strategy.train()
    for micro_batches in step_batches(trainer.train_data, state, total, cfg.train.grad_accum, clock):
        result, losses = train_step(strategy, trainer.loss_fn, micro_batches, trainer.adjust_input, stop.exit_code())
        state.step += 1
        window.add(losses)
        trainer.count_skip(state, result, log)
        if due(state.step, every, total):
            values = {
                "epoch": state.epoch,
                "lr": strategy.lr(),
                "grad_norm": result.grad_norm,
                "skipped_steps": state.skipped_steps,
                **window.close(),
            }
            log.print(format_train_line(state.step, total, values))
            log.record("train", state.step, {**{k: v for k, v in values.items() if k != "losses"}, **values["losses"]})
        validated = due(state.step, cfg.eval.every, total)
        if validated:
            trainer.validate_and_keep_best(state, log)
        # The step's all-reduce told every rank whether any rank was signalled; a signal that came
        # during validation is agreed on right after it.
        stopped = result.stop or (validated and int(dist.all_reduce_scalar(stop.exit_code(), "max")))
        # Save the full training state, but not in the middle of a streak of skipped steps: the
        # newest checkpoint stays the last one whose step went through.
        if (
            (due(state.step, cfg.checkpoint.every, total) or stopped)
            and state.bad_streak == 0
            and state.saved_step != state.step
        ):
            trainer.save(state)
        if stopped:
            dist.barrier()  # every rank is done with the checkpoint before any launcher acts on the stop (e.g. requeues)
            log.print(
                f"stopped at step {state.step} on {stop.describe() if stop.requested else 'a signal to another rank'}; "
                f"the newest checkpoint is step {state.saved_step}"
            )
            break
    log.close()
    return TrainResult(step=state.step, best=state.best, skipped_steps=state.skipped_steps, stopped=stopped)
