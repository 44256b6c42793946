"""Everything a run directory and a job's life need, below the trainer and the commands.

- `rundir`: the run directory: its layout (`RunDir`, the one place its paths are spelled), the
  writer's lock, metrics.jsonl, leftovers of crashes, start-over.
- `checksums`: file and tensor digests; a checkpoint's checksums.json; weights-only loading.
- `state`: what the training loop carries across a checkpoint (`TrainState`, its `Best`).
- `checkpoint`: atomic save and verified resume of `checkpoints/step-N/`; best.pt.
- `runlog`: what a run reports, fanned out to the console, metrics.jsonl, W&B and plots.
- `wandb_run`: the W&B run (offline or online), its id, and the reader of its offline log.
- `plots`: runs/NAME/plots/ (validation history, curves, prediction panels).
- `preemption`: stop signals, the agreed stop, the exit codes that ask Slurm to requeue.
"""
