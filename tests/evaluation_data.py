"""Test helpers for predict, evaluate and export: a small real best.pt, and datasets of odd sizes on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from salnet.config import load_config
from salnet.model import build_model
from salnet.run.checkpoint import save_best

from shards_data import write_pair

EVAL_SIZE = 64
# (height, width): odd, non-square, portrait and landscape
SIZES = [(45, 67), (64, 64), (71, 38), (33, 91), (50, 50), (57, 83), (40, 40)]


def tiny_checkpoint(run_dir: Path, seed: int = 0) -> Path:
    """best.pt of a resnet18 SalNet (random init, 32-channel decoder) whose BatchNorm statistics are not the identity."""
    cfg = load_config(
        None,
        [
            "name=tiny",
            "model.backbone.name=resnet18",
            "model.ppm_width=32",
            "model.fpn_width=32",
            f"data.eval_size={EVAL_SIZE}",
            "data.eval_batch_size=4",
            "data.workers=0",
        ],
    )
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, EVAL_SIZE, EVAL_SIZE) * 4 - 2)
    return save_best(run_dir, model.state_dict(), cfg.model_dump(mode="json"), {"maxF": 0.0}, step=1)


def ecssd_folder(root: Path, count: int, image_ext: str = ".jpg", first_seed: int = 0) -> list[str]:
    """An ECSSD-layout dataset (images/ + ground_truth_mask/) of `count` pairs of the SIZES; returns the stems."""
    stems = [f"img_{i:03d}" for i in range(count)]
    for i, stem in enumerate(stems):
        h, w = SIZES[i % len(SIZES)]
        write_pair(
            root / "images" / f"{stem}{image_ext}",
            root / "ground_truth_mask" / f"{stem}.png",
            h,
            w,
            seed=first_seed + i,
        )
    return stems
