"""`python -m salnet.strategy.convert CHECKPOINT OUT_DIR`: a checkpoint to best.pt's format.

    python -m salnet.strategy.convert runs/duts_r50_zero2/checkpoints/step-00004000 exported/
    -> exported/best.pt

CHECKPOINT is one `checkpoints/step-NNNNNNNN` directory of a run, written by either strategy (DDP,
or DeepSpeed ZeRO of any stage: the partitions of every rank are merged), verified against its
checksums.json first as resume does (a bad file is an error naming it). OUT_DIR/best.pt then
holds the fp32 weights of the plain network and the run's config, exactly as training writes
best.pt (its metrics are empty: nothing was validated), so predict, evaluate and export take it.
The config comes from the run's config.yaml (two levels above CHECKPOINT) unless --config names
another; the weights are checked key by key and shape by shape against the network it builds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from salnet.config import ConfigError, load_config
from salnet.model import build_model
from salnet.run.checkpoint import save_best
from salnet.run.checksums import verify
from salnet.run.rundir import RunDir
from salnet.strategy import ddp


def consolidated_weights(checkpoint: Path) -> dict:
    """fp32 weights of the plain network from a checkpoint directory of either strategy."""
    if (checkpoint / ddp.STATE_FILE).is_file():
        return ddp.consolidated_weights(checkpoint)
    from salnet.strategy import zero  # imports DeepSpeed (seconds): only for its checkpoints

    if not (checkpoint / zero.TAG).is_dir():
        raise FileNotFoundError(
            f"{checkpoint} is neither a DDP checkpoint ({ddp.STATE_FILE}) nor a DeepSpeed one ({zero.TAG}/); "
            f"expected a runs/NAME/checkpoints/step-NNNNNNNN directory"
        )
    return zero.consolidated_weights(checkpoint)


def convert(checkpoint: Path, out_dir: Path, config_path: Path | None = None) -> Path:
    verify(checkpoint)  # as resume does: best.pt's fresh digest must not vouch for corrupted weights
    weights = consolidated_weights(checkpoint)
    config_path = config_path or RunDir(checkpoint.parent.parent).config
    cfg = load_config(str(config_path))
    # The network's structure only: its backbone weights would be replaced anyway.
    structure = cfg.model.model_copy(update={"backbone": cfg.model.backbone.model_copy(update={"weights": "none"})})
    expected = build_model(structure).state_dict()
    wrong = sorted(set(expected) ^ set(weights)) + [
        k for k in expected if k in weights and weights[k].shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(
            f"{checkpoint} does not hold the network of {config_path} (model section); "
            f"mismatched keys: {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}"
        )
    return save_best(
        out_dir, {k: weights[k] for k in expected}, cfg.model_dump(mode="json"), {}, RunDir.checkpoint_step(checkpoint)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m salnet.strategy.convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-NNNNNNNN directory")
    parser.add_argument("out_dir", type=Path, help="where best.pt is written")
    parser.add_argument(
        "--config", type=Path, help="the run's config (default: config.yaml two levels above CHECKPOINT)"
    )
    args = parser.parse_args(argv)
    try:
        path = convert(args.checkpoint, args.out_dir, args.config)
    except (
        ConfigError,
        OSError,
        ValueError,
        RuntimeError,
    ) as e:  # RuntimeError: a file torch refuses (named by load_file)
        print(f"{parser.prog}: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
