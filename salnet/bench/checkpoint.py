"""`python -m salnet.bench checkpoint`: what verified checkpoints cost at save and at resume.

For the demo network (ResNet-18) and the ResNet-50 recipe, with AdamW state (weights + two
moments), one process, in a temporary directory on the run's filesystem:
- save: the same state written with torch.save + fsync (plain) and with the XXH3 hash computed while
  writing (hashed): their difference is what the checksums cost; and salnet's whole
  save_checkpoint (state dicts, hashed write, checksums.json, fsync, atomic rename);
- resume: verify (read back and hash every file) against loading the state (torch.load).
Interleaved repeats, medians. Last line: one JSON object.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from salnet.bench._harness import emit, interleaved, machine, medians, parser, ratio, timed

BACKBONES = ("resnet18", "resnet50")


def main(argv: list[str]) -> None:
    cli = parser("checkpoint", __doc__.splitlines()[0], repeats=5)
    cli.add_argument("--dir", default=None, help="where to write (default: a temporary directory under runs/)")
    args = cli.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.dir or "runs")
    root.mkdir(parents=True, exist_ok=True)
    result = {"repeats": args.repeats, **machine()}
    with tempfile.TemporaryDirectory(dir=root, prefix=".bench-checkpoint-") as tmp:
        for backbone in BACKBONES:
            result[backbone] = measure(Path(tmp) / backbone, backbone, args.repeats)
    emit(result)


def measure(directory: Path, backbone: str, repeats: int) -> dict:
    from salnet.config import load_config
    from salnet.model import build_model
    from salnet.run.checkpoint import ClientState, save_checkpoint
    from salnet.run.checksums import save_hashed, verify
    from salnet.run.rundir import RunDir
    from salnet.run.state import TrainState
    from salnet.strategy import build_strategy

    cfg = load_config(
        None, [f"model.backbone.name={backbone}", "model.backbone.weights=none", "train.channels_last=false"]
    )
    strategy = build_strategy(cfg, build_model(cfg.model), total_steps=10)
    for p in strategy.module.parameters():  # one AdamW step, so the moments exist and are saved
        p.grad = torch.zeros_like(p)
    strategy.optimizer.step()
    client = ClientState(train=TrainState(step=1), world_size=1, loader=[{}], rng=[{}])
    state = {"model": strategy.module.state_dict(), "optimizer": strategy.optimizer.state_dict()}
    plain = directory / "plain.pt"
    directory.mkdir(parents=True)

    def plain_save(_):
        def write():
            with open(plain, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        return timed(write)[1]

    def hashed_save(_):
        def write():
            save_hashed(state, plain)
            with open(plain, "rb") as f:
                os.fsync(f.fileno())

        return timed(write)[1]

    def salnet_save(repeat):
        shutil.rmtree(RunDir(directory).checkpoints, ignore_errors=True)
        return timed(lambda: save_checkpoint(directory, 1, strategy, client, keep=1))[1]

    saves = medians(
        interleaved(repeats, {"plain_save_s": plain_save, "hashed_save_s": hashed_save, "salnet_save_s": salnet_save})
    )
    checkpoint = RunDir(directory).checkpoint(1)
    loads = medians(
        interleaved(
            repeats,
            {
                "load_s": lambda _: timed(lambda: torch.load(checkpoint / "state.pt", weights_only=True))[1],
                "verify_s": lambda _: timed(lambda: verify(checkpoint))[1],
            },
        )
    )
    size = (checkpoint / "state.pt").stat().st_size
    out = {
        "checkpoint_mib": round(size / 2**20, 1),
        **{k: round(v, 4) for k, v in {**saves, **loads}.items()},
        "hashed_over_plain": ratio(saves["hashed_save_s"], saves["plain_save_s"]),
        "save_over_plain": ratio(saves["salnet_save_s"], saves["plain_save_s"]),
        "verify_over_load": ratio(loads["verify_s"], loads["load_s"]),
    }
    print(
        f"{backbone}: {out['checkpoint_mib']} MiB; plain write {out['plain_save_s']:.3f} s, hashed {out['hashed_save_s']:.3f} s "
        f"({out['hashed_over_plain']}x), save_checkpoint {out['salnet_save_s']:.3f} s ({out['save_over_plain']}x); verify {out['verify_s']:.3f} s vs load {out['load_s']:.3f} s",
        flush=True,
    )
    return out
