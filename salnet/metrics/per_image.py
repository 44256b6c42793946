"""`PerImage`: each image's own metric values with its key, what `SODMetrics` sums over images.

`SODMetrics(..., per_image=True)` keeps them (`SODMetrics.per_image()`); the dataset metrics are
means of these rows (`PerImage.compute()` equals `SODMetrics.compute()`), which is what lets
`salnet.metrics.bootstrap` resample images. One array per summed quantity (`accumulator.FIELDS`):
scalars (S, MAE, adpF, ...) as float64 [N]; curves over the thresholds (precision, recall, F, E,
IoU, ...) as float32 [N, 256] (about 1e-8 off float64 in each value, so the means stay well within
1e-6 of compute(), at half the memory: 4 KiB per image and curve).

Rows are sorted by key, so two methods' `PerImage`s of one dataset line up image by image.
`save()` / `load()` keep them as one .npz: "keys" (str [N]), "families" (the metric families) and
one array per quantity under its name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from salnet.metrics.names import FAMILIES, FAMILY_METRICS

CURVE_DTYPE = np.float32
CURVE_TORCH_DTYPE = torch.float32


def summarise(means: Mapping[str, torch.Tensor], families: Iterable[str]) -> dict[str, torch.Tensor]:
    """The dataset metrics of `families` from the per-image quantities' means over images (`FIELDS`
    names): a name starting with max or mean is that summary of a mean curve over its last axis,
    the others are the mean itself, as given. Leading axes are kept, so [R, 256] means of R resamples
    give R values of each metric: maxF is the max of each resample's mean curve, never a mean of maxima."""
    out = {}
    chosen = set(families)
    for family in (f for f in FAMILIES if f in chosen):
        for name in FAMILY_METRICS[family]:
            if name.startswith(("max", "mean")):
                curve = means[name.removeprefix("max").removeprefix("mean")]
                out[name] = curve.amax(-1) if name.startswith("max") else curve.mean(-1)
            else:
                out[name] = means[name]
    return out


def needed_fields(families: Iterable[str]) -> list[str]:
    """The per-image quantities `summarise` reads for `families` (precision and recall are curves only)."""
    chosen = set(families)
    names = []
    for family in (f for f in FAMILIES if f in chosen):
        for name in FAMILY_METRICS[family]:
            field = name.removeprefix("max").removeprefix("mean") if name.startswith(("max", "mean")) else name
            if field not in names:
                names.append(field)
    return names


@dataclass
class PerImage:
    """One dataset's per-image values for one method: `keys` (sorted) and `values[name]` aligned with them.

    `per_image["MAE"]` is that quantity as float64 ([N], or [N, 256] for a curve).
    """

    families: tuple[str, ...]
    keys: list[str]
    values: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        for name, array in self.values.items():
            if array.shape[0] != len(self.keys):
                raise ValueError(f"per-image {name!r} has {array.shape[0]} rows for {len(self.keys)} keys")
        if any(a >= b for a, b in zip(self.keys, self.keys[1:])):
            raise ValueError("per-image keys must be sorted and distinct")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name].astype(np.float64)

    def means(self, fields: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """float64 means over the images of each quantity (all, or `fields`)."""
        return {
            name: torch.from_numpy(self.values[name]).to(torch.float64).mean(0)
            for name in (self.values if fields is None else fields)
        }

    def compute(self) -> dict[str, float]:
        """The dataset metrics, as `SODMetrics.compute()` gives them for the same images."""
        if not self.keys:
            raise RuntimeError("PerImage holds no images")
        return {name: value.item() for name, value in summarise(self.means(), self.families).items()}

    def save(self, path: os.PathLike | str) -> None:
        """One compressed .npz (see the module docstring); `load()` reads it back."""
        np.savez_compressed(path, keys=np.array(self.keys, dtype=str), families=np.array(self.families), **self.values)

    @classmethod
    def load(cls, path: os.PathLike | str) -> PerImage:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
        keys, families = arrays.pop("keys"), arrays.pop("families")
        return cls(tuple(str(x) for x in families), [str(k) for k in keys], arrays)

    @classmethod
    def from_rows(cls, families: Iterable[str], parts: Iterable[tuple[list[str], dict[str, torch.Tensor]]]) -> PerImage:
        """Batches of (keys, {name: per-image tensor}), from any number of updates and ranks, joined
        and sorted by key; a key found twice is an error naming it."""
        keys: list[str] = []
        columns: dict[str, list[torch.Tensor]] = {}
        for part_keys, values in parts:
            keys += part_keys
            for name, value in values.items():
                columns.setdefault(name, []).append(value.cpu())
        order = sorted(range(len(keys)), key=keys.__getitem__)
        ordered = [keys[i] for i in order]
        twice = sorted({a for a, b in zip(ordered, ordered[1:]) if a == b})
        if twice:
            shown = ", ".join(repr(k) for k in twice[:10])
            raise ValueError(
                f"per-image statistics: {len(twice)} image keys occur twice ({shown}); keys must be unique"
            )
        index = torch.tensor(order, dtype=torch.int64)
        values = {}
        for name, parts_of_name in columns.items():
            joined = torch.cat(parts_of_name)[index] if parts_of_name else torch.zeros(0)
            dtype = CURVE_DTYPE if joined.dim() > 1 else np.float64
            values[name] = joined.numpy().astype(dtype, copy=False)
        return cls(tuple(families), ordered, values)
