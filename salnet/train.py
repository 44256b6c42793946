"""The main job: `torchrun --nproc_per_node N -m salnet.train --config configs/X.yaml [key=value ...]`.

Also runs under srun/Submitit (Slurm variables, no torchrun) or as one plain process. This is
only the entry point: it reads the config (a mistake is reported before torch is even imported),
arms the stop signals, joins the process group and runs the loop of salnet/trainer.py, which reads
like the pipeline: prepare data, adjust input, build the network, set the loss, set the optimizer,
resume, iterate (forward, loss, backward, step), validate, keep the best, save, until done.
"""

from __future__ import annotations

import sys
import traceback

from salnet.config import check_runnable, cuda_may_be_present, parse_config
from salnet.run.preemption import EXIT_REQUEUE, StopRequest


def said_in_full() -> tuple[type[Exception], ...]:
    """The errors whose message says everything the user needs (the file, key or value at fault and
    what would be valid): printed as one line. Any other exception is a bug: its traceback too."""
    from salnet.config import ConfigError
    from salnet.data.sources import DataError
    from salnet.imagecheck import ImageError
    from salnet.model.weights import BackboneWeightsError
    from salnet.run.checkpoint import CheckpointSaveError
    from salnet.run.checksums import CheckpointCorrupt
    from salnet.run.rundir import RunDirLocked, RunDirUnsafe
    from salnet.shards.manifest import ShardsError
    from salnet.trainer import TrainingDiverged

    return (
        ConfigError,
        DataError,
        ImageError,
        ShardsError,
        BackboneWeightsError,
        CheckpointCorrupt,
        CheckpointSaveError,
        RunDirLocked,
        RunDirUnsafe,
        TrainingDiverged,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        argv,
        prog="python -m salnet.train",
        description=__doc__.split("\n\n")[0],
        check=lambda cfg: check_runnable(cfg, cuda=cuda_may_be_present()),
    )
    stop = StopRequest()
    # Before anything slow. Until the first step's agreement there is nothing to save: a stop signal
    # (or the launcher's death) during start-up, the rendezvous included, ends the process at once.
    stop.install().exit_at_once()

    from salnet import dist  # torch from here on
    from salnet.run.rundir import RunDir
    from salnet.run.runlog import setup_logging
    from salnet.trainer import train

    user_errors = said_in_full()

    with dist.distributed(timeout_s=cfg.train.timeout_s):
        setup_logging()
        try:
            result = train(cfg, stop)
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, wherever it was
            print(f"[rank {dist.rank()}] interrupted: stopped at once, without saving", file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as e:
            # Errors name their rank: in a multi-rank job the first failure is what matters.
            print(f"[rank {dist.rank()}] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if not isinstance(e, user_errors):
                traceback.print_exc()
            sys.exit(1)
        if result.stopped:
            # Said in words too: torchrun's agent exits with its own status (1 after SIGTERM, 140 after
            # SIGUSR2), so under torchrun this line is where the ranks' code shows.
            meaning = "requeue me" if result.stopped == EXIT_REQUEUE else "do not requeue"
            dist.print0(f"exit status {result.stopped}: checkpoint saved, {meaning}")
            sys.exit(result.stopped)
        if result.best:
            dist.print0(
                f"done: {result.step} steps; best {result.best.metric}={result.best.value:.4f} "
                f"at step {result.best.step} -> {RunDir(cfg.run_dir).best}"
            )


if __name__ == "__main__":
    main()
