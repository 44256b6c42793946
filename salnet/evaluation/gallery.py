"""The gallery of an evaluation: per dataset, the images worth looking at, side by side for every method.

    description = write_gallery(OUT, "DUTS-TE", {method: {key: MAE}}, source, k=6)

Chosen from the per-image MAE of each method (what scoring kept; nothing else is read to choose):

- where the methods differ most: the k images with the largest gap between the best and the worst
  method's MAE (only with two methods or more; over the images every method scored);
- each method's worst images: its k highest MAEs.

Each chosen image is drawn once as image | ground truth | every method's map, full size (the GT's
size, as it was scored) and as a thumbnail, under OUT/gallery/DATASET/ (numbered files: no key
or name becomes a path); the returned description (salnet.pages.pictures' shape, paths relative
to OUT) is what index.html renders. Only the chosen images are read again, from a picture source:

- `FolderPictures`: --pred/--gt folders. The GT and the maps are read as scoring read them
  (salnet.evaluation.folders: a map of another size resized to its mask); the RGB image is shown
  when the GT location is a dataset folder in a layout that holds images (ECSSD, DUTS, ...).
- `ShardPictures`: --checkpoint on --data shard sets. The chosen samples are read from the shard
  set (their members only; the rest is streamed past unread) and each checkpoint predicts them as
  validation does (input at its eval size, probabilities resized to the mask): nothing was kept in
  memory while the whole set was scored.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from salnet.config import DataConfig
from salnet.data.reader import RawSample
from salnet.data.sources import Limits, open_shard, open_shard_set
from salnet.data.transforms import SampleError, decode_sample, resize_for_eval
from salnet.evaluation import folders
from salnet.evaluation.common import EvaluationError, Predict, load_best_weights, make_predict
from salnet.metrics.inputs import to_levels
from salnet.pages.html import number
from salnet.pages.pictures import save_picture
from salnet.shards.format import split_member_name
from salnet.shards.images import BadFileError, mask_levels, prepare_image, read_file
from salnet.shards.layouts import find_pairs
from salnet.shards.tario import ShardTar
from salnet.validate import probabilities_at

DEFAULT_K = 6  # images per section
NO_LIMITS_GIVEN = Limits()  # the readers' default limits (data.max_member_bytes, max_pixels)
FOLDER = "gallery"


class PictureSource(Protocol):
    def truth(self, keys: list[str]) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
        """key -> (RGB image uint8 [H, W, 3] or None where there is none, GT uint8 [H, W])."""

    def maps(self, keys: list[str]) -> dict[str, dict[str, np.ndarray]]:
        """method -> key -> map uint8 [H, W] at the GT's size: the levels scored, floor(255 p)."""


@dataclass
class Section:
    title: str
    note: str
    keys: list[str]


def choose(mae: dict[str, dict[str, float]], k: int = DEFAULT_K) -> list[Section]:
    """The gallery's sections (the module docstring's rule); ties broken by key, so the choice is repeatable."""
    if not mae or not all(mae.values()):
        empty = [m for m, by_key in mae.items() if not by_key]
        raise EvaluationError(
            f"gallery: no per-image MAE to choose from (methods without images: {empty or 'none given'})"
        )
    sections = []
    if len(mae) > 1:
        common = sorted(set.intersection(*(set(by_key) for by_key in mae.values())))
        gaps = {key: max(v[key] for v in mae.values()) - min(v[key] for v in mae.values()) for key in common}
        chosen = sorted(gaps, key=lambda key: (-gaps[key], key))[:k]
        if chosen:
            sections.append(
                Section(
                    "where the methods differ most",
                    "the largest gaps between the methods' per-image MAE (highest minus lowest)",
                    chosen,
                )
            )
    for method, by_key in mae.items():
        worst = sorted(by_key, key=lambda key: (-by_key[key], key))[:k]
        sections.append(Section(f"worst images of {method}", f"the highest per-image MAE of {method}", worst))
    return sections


def write_gallery(
    out: Path, dataset: str, mae: dict[str, dict[str, float]], source: PictureSource, k: int = DEFAULT_K
) -> dict:
    """Write OUT/gallery/DATASET/ (replacing what an earlier run left there); returns the description."""
    sections = choose(mae, k)
    keys = list(dict.fromkeys(key for s in sections for key in s.keys))
    truth, maps = source.truth(keys), source.maps(keys)
    folder = f"{FOLDER}/{dataset}"
    shutil.rmtree(Path(out) / folder, ignore_errors=True)
    methods = list(mae)
    cells: dict[str, list[dict | None]] = {}
    for number_, key in enumerate(keys):
        image, gt = truth.get(key, (None, None))
        pictures = [image, gt, *(maps.get(m, {}).get(key) for m in methods)]
        names = ["image", "gt", *(f"map{i}" for i in range(len(methods)))]
        cells[key] = [
            None if p is None else save_picture(Path(out), folder, f"{number_:03d}-{name}", p)
            for p, name in zip(pictures, names, strict=True)
        ]
    return {
        "columns": ["image", "ground truth", *methods],
        "sections": [
            {
                "title": s.title,
                "note": s.note,
                "rows": [
                    {
                        "key": key,
                        "caption": "\n".join(f"MAE {number(mae[m].get(key))} {m}" for m in methods),
                        "cells": cells[key],
                    }
                    for key in s.keys
                ],
            }
            for s in sections
        ],
    }


def _levels(probabilities: torch.Tensor) -> np.ndarray:
    """The 8-bit levels that were scored (floor(255 p)), as a saved map holds them."""
    return to_levels(probabilities).to(torch.uint8).cpu().numpy()


class FolderPictures:
    """Pictures of --pred/--gt folders: `gt_location` as given to --gt, `pred_dirs` method -> the
    dataset's map folder (folders.prediction_dir)."""

    def __init__(self, gt_location: Path, pred_dirs: dict[str, Path], limits: Limits = NO_LIMITS_GIVEN):
        self.masks = folders.ground_truth(gt_location)
        # A dataset layout also holds the images; a plain folder of masks does not.
        self.images = (
            {}
            if folders.has_images(gt_location)
            else {Path(p.image).stem: Path(p.image) for p in find_pairs(gt_location).pairs}
        )
        self.pred_dirs, self.limits = pred_dirs, limits

    def truth(self, keys: list[str]) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
        out = {}
        for key in keys:
            try:
                gt, _ = mask_levels(self._read(self.masks[key]), str(self.masks[key]), self.limits.max_pixels)
            except (BadFileError, KeyError):
                continue
            out[key] = (self._image(key, gt.shape), gt)
        return out

    def _read(self, path: Path) -> bytes:
        return read_file(str(path), self.limits.max_member_bytes, "for one file; not read")

    def _image(self, key: str, size: tuple[int, int]) -> np.ndarray | None:
        path = self.images.get(key)
        if path is None:
            return None
        try:  # read as pack reads images (EXIF upright), at the mask's size
            prepared = prepare_image(self._read(path), str(path), None, self.limits.max_pixels, size)
        except BadFileError:
            return None
        return np.asarray(Image.open(io.BytesIO(prepared.data)).convert("RGB"))

    def maps(self, keys: list[str]) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        for method, pred_dir in self.pred_dirs.items():
            files = folders.image_files(pred_dir, "prediction")
            out[method] = {}
            for key in keys:
                if key in files and key in self.masks:
                    try:
                        probabilities, _ = folders.read_pair(self.masks[key], files[key], self.limits)
                    except BadFileError:
                        continue
                    out[method][key] = _levels(probabilities)
        return out


def read_keys(location: str, keys: list[str], limits: Limits = NO_LIMITS_GIVEN) -> dict[str, RawSample]:
    """The samples named `keys` of the shard set at `location`: only their members are read, the
    rest streamed past (the set was read whole and checked while it was scored)."""
    wanted, found = set(keys), {}
    for shard in open_shard_set(location, limits).shards:
        stream = open_shard(shard)
        try:
            tar = ShardTar(stream, limits.max_member_bytes)
            for info in tar:
                key, ext = split_member_name(info.name)
                if info.isreg() and key in wanted:
                    sample = found.setdefault(key, RawSample(shard.name, -1, key, {}, limits.max_pixels))
                    sample.members[ext] = tar.read(info)
        finally:
            stream.close()
        if len(found) == len(wanted) and all(len(s.members) >= 2 for s in found.values()):
            break  # all found (an image and a mask each): the remaining shards need not be streamed
    return found


class ShardPictures:
    """Pictures of --checkpoint on a --data shard set: `predictors` method -> (predict, eval size)."""

    def __init__(self, location: str, predictors: dict[str, tuple[Predict, int]], limits: Limits = NO_LIMITS_GIVEN):
        self.location, self.predictors, self.limits = location, predictors, limits
        self._decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _samples(self, keys: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._decoded is None:  # read once for truth() and maps()
            self._decoded = {}
            for key, raw in read_keys(self.location, keys, self.limits).items():
                try:
                    self._decoded[key] = decode_sample(raw)
                except SampleError:
                    continue
        return self._decoded

    def truth(self, keys: list[str]) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
        return {
            key: (image.permute(1, 2, 0).numpy(), mask[0].numpy()) for key, (image, mask) in self._samples(keys).items()
        }

    @torch.no_grad()
    def maps(self, keys: list[str]) -> dict[str, dict[str, np.ndarray]]:
        samples = self._samples(keys)
        out: dict[str, dict[str, np.ndarray]] = {}
        for method, (predict, size) in self.predictors.items():
            out[method] = {}
            for key, (image, mask) in samples.items():
                logits = predict(resize_for_eval(image, size)[None])
                out[method][key] = _levels(probabilities_at(logits, [tuple(mask.shape[-2:])])[0])
        return out


def checkpoint_predictor(path: Path | str, size: int | None, precision: str | None) -> tuple[Predict, int]:
    """(predict, eval size) of a best.pt as `salnet.evaluate --checkpoint` scored it (--size, --precision)."""
    best = load_best_weights(path)
    eval_size = size or best.setting("data", "eval_size", DataConfig.model_fields["eval_size"].default)
    return make_predict(best, best.precision(precision)), int(eval_size)


class CombinedPictures:
    """Several sources of one dataset (--checkpoint and --pred methods together): the first source's
    truth, every source's maps."""

    def __init__(self, sources: list[PictureSource]):
        self.sources = sources

    def truth(self, keys: list[str]) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
        return self.sources[0].truth(keys)

    def maps(self, keys: list[str]) -> dict[str, dict[str, np.ndarray]]:
        return {method: by_key for source in self.sources for method, by_key in source.maps(keys).items()}


class GallerySources:
    """What `salnet.evaluate` records while it scores (which best.pt or map folder each method of each
    dataset came from), so that the galleries can read the chosen images again afterwards."""

    def __init__(self, size: int | None = None, precision: str | None = None, limits: Limits = NO_LIMITS_GIVEN):
        self.size, self.precision, self.limits = size, precision, limits
        self.checkpoints: dict[str, tuple[str, dict[str, str]]] = {}  # dataset -> (shard location, {method: best.pt})
        self.folders: dict[str, tuple[Path, dict[str, Path]]] = {}  # dataset -> (GT location, {method: map folder})

    def add_checkpoint(self, dataset: str, method: str, location: str, checkpoint: Path | str) -> None:
        self.checkpoints.setdefault(dataset, (location, {}))[1][method] = str(checkpoint)

    def add_folder(self, dataset: str, method: str, gt_location: Path, pred_dir: Path) -> None:
        self.folders.setdefault(dataset, (Path(gt_location), {}))[1][method] = Path(pred_dir)

    def source(self, dataset: str, predictors: dict[str, tuple[Predict, int]]) -> PictureSource | None:
        sources: list[PictureSource] = []
        if dataset in self.checkpoints:
            location, methods = self.checkpoints[dataset]
            sources.append(ShardPictures(location, {m: predictors[path] for m, path in methods.items()}, self.limits))
        if dataset in self.folders:
            sources.append(FolderPictures(*self.folders[dataset], self.limits))
        return None if not sources else sources[0] if len(sources) == 1 else CombinedPictures(sources)

    def write(self, out: Path, per_image: dict[str, dict], k: int = DEFAULT_K) -> dict[str, dict]:
        """Every dataset's gallery under OUT/gallery/ from the per-image MAE (`per_image[dataset][method]`:
        `.keys` and `["MAE"]`, salnet.metrics.PerImage); {dataset: description} for index.html. A
        dataset scored without MAE (--metrics without it) has no gallery."""
        paths = {path for _, methods in self.checkpoints.values() for path in methods.values()}
        predictors = {path: checkpoint_predictor(path, self.size, self.precision) for path in sorted(paths)}
        galleries = {}
        for dataset, by_method in per_image.items():
            if not by_method or k <= 0 or not all("MAE" in rows.values for rows in by_method.values()):
                continue
            mae = {m: dict(zip(rows.keys, rows["MAE"].tolist(), strict=True)) for m, rows in by_method.items()}
            source = self.source(dataset, predictors)
            if source is not None:
                galleries[dataset] = write_gallery(out, dataset, mae, source, k)
        return galleries
