"""Saliency maps and ground truths in folders: matched by file stem, read as PySODEvalToolkit reads them.

- Ground truth (`--gt NAME=PATH`): a folder with the masks directly in it, or a dataset folder in a
  layout `salnet.shards pack` knows (its pairs' masks, each under its image's stem).
- Predictions of a method (`--pred METHOD=DIR`): DIR/NAME/ for dataset NAME (what
  `salnet.predict` writes and PySODEvalToolkit reads); with a single dataset, DIR itself may hold
  the maps when it has no NAME/ folder.
- Files are image files (.png, .jpg, ...; any case) directly in the folder, matched by stem; a stem
  held by two files of one folder is an error.
- Reading: masks and maps by the one rule pack reads masks with (salnet.shards.images.grey_levels):
  a file above `max_member_bytes` is not read, one whose header declares more than `max_pixels`
  is not decoded, truncated or corrupt data is refused, EXIF orientation is applied, grey stored
  as RGB, palette or with alpha is that grey (alpha: onto black), 16-bit values above 255 are
  value / 257, and a colour image (any pixel with R, G, B not all equal) is refused: it has no one
  reading. A mask of only 0 and 1 is scaled to 0/255 as pack scales it; a map's levels are scored
  as stored. Each refusal is a BadFileError naming the file. For the 8-bit grey PNG and JPEG files
  of published sets this is what PySODEvalToolkit's `cv2.imread(path, cv2.IMREAD_GRAYSCALE)`
  gives; a prediction whose size differs from its GT's is resized to the GT's with
  `cv2.resize(pred, (W, H), interpolation=cv2.INTER_LINEAR)`, as its `get_gt_pre_with_name`
  does, so the numbers are comparable with published ones. GT foreground is GT > 128 (salnet.metrics).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from salnet.data.sources import Limits
from salnet.evaluation.common import EvaluationError, names_listed
from salnet.shards.images import grey_levels, mask_levels, read_file
from salnet.shards.layouts import IMAGE_EXTENSIONS, find_pairs


def _cv2():
    try:
        import cv2
    except ImportError:
        raise EvaluationError(
            "scoring folders of maps needs OpenCV (the reader PySODEvalToolkit uses): "
            "pip install opencv-python-headless"
        ) from None
    return cv2


def image_files(folder: Path, what: str) -> dict[str, Path]:
    """stem -> path of the image files directly in `folder`."""
    by_stem: dict[str, list[str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if not entry.name.startswith(".") and ext.lower() in IMAGE_EXTENSIONS and entry.is_file():
                by_stem.setdefault(stem, []).append(entry.name)
    twice = sorted(f"{stem} ({', '.join(sorted(names))})" for stem, names in by_stem.items() if len(names) > 1)
    if twice:
        raise EvaluationError(
            f"{what} folder '{folder}': {len(twice)} stems belong to several files, which is ambiguous: "
            f"{names_listed(twice)}"
        )
    return {stem: folder / names[0] for stem, names in sorted(by_stem.items())}


def has_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(
            not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file()
            for e in entries
        )


def ground_truth(location: Path) -> dict[str, Path]:
    """stem -> mask path of a GT folder or of a dataset folder in a known layout."""
    if not location.is_dir():
        raise EvaluationError(f"ground-truth folder '{location}' does not exist or is not a folder")
    if has_images(location):
        return image_files(location, "ground-truth")
    found = find_pairs(location)  # a known layout, or a ShardsError saying what was looked for
    return {Path(pair.image).stem: Path(pair.mask) for pair in found.pairs}


def prediction_dir(method_dir: Path, dataset: str, only_dataset: bool) -> Path:
    if not method_dir.is_dir():
        raise EvaluationError(f"prediction folder '{method_dir}' does not exist or is not a folder")
    if (method_dir / dataset).is_dir():
        return method_dir / dataset
    if only_dataset and has_images(method_dir):
        return method_dir
    folders = sorted(p.name for p in method_dir.iterdir() if p.is_dir())
    raise EvaluationError(
        f"prediction folder '{method_dir}' has no folder '{dataset}' for dataset {dataset}"
        + (f" (its folders: {names_listed(folders)})" if folders else "")
        + ("; with one dataset it may hold the maps directly" if only_dataset else "")
    )


@dataclass
class Matched:
    pairs: list[tuple[str, Path, Path]]  # (stem, GT path, prediction path), sorted by stem
    missing: list[str] = field(default_factory=list)  # GT stems without a prediction
    extra: list[str] = field(default_factory=list)  # prediction stems without a GT


def match(gt: dict[str, Path], pred_dir: Path, label: str, allow_missing: bool) -> Matched:
    preds = image_files(pred_dir, "prediction")
    matched = Matched(
        [(stem, gt[stem], preds[stem]) for stem in sorted(gt.keys() & preds.keys())],
        sorted(gt.keys() - preds.keys()),
        sorted(preds.keys() - gt.keys()),
    )
    problems = []
    if matched.missing:
        problems.append(
            f"{len(matched.missing)} ground truths have no prediction in '{pred_dir}': {names_listed(matched.missing)}"
        )
    if matched.extra:
        problems.append(
            f"{len(matched.extra)} predictions in '{pred_dir}' have no ground truth: {names_listed(matched.extra)}"
        )
    if problems and not allow_missing:
        raise EvaluationError(
            f"{label}: " + "; ".join(problems) + "\npass --allow-missing to score the matched pairs only "
            "(the missing and extra counts are reported)"
        )
    if not matched.pairs:
        raise EvaluationError(f"{label}: no prediction in '{pred_dir}' matches a ground truth by file stem")
    return matched


def read_pair(gt_path: Path, pred_path: Path, limits: Limits) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction as float32 probabilities level/255 at the GT's size, GT uint8), read by the module
    docstring's rule; BadFileError naming the file that cannot be read so."""
    cv2 = _cv2()
    gt, _ = mask_levels(_read(gt_path, limits), str(gt_path), limits.max_pixels)
    pred, _ = grey_levels(_read(pred_path, limits), str(pred_path), limits.max_pixels, what="saliency map")
    if pred.shape != gt.shape:
        pred = cv2.resize(pred, dsize=gt.shape[::-1], interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    # level / 255 in float32 gives back floor(255 p) == level exactly for every level (salnet.metrics quantises so).
    pred, gt = (torch.from_numpy(np.require(a, requirements="W")) for a in (pred, gt))  # Pillow's are read-only
    return pred.float().div_(255), gt


def _read(path: Path, limits: Limits) -> bytes:
    return read_file(str(path), limits.max_member_bytes, "for one file; not read (raise it with --max-member-bytes)")
