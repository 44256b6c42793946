"""`SODMetrics`: per-image metrics summed into one float64 vector that an all-reduce merges, and,
when asked for, each image's own values with its key (`PerImage`), gathered over ranks."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from salnet import dist
from salnet.metrics.histogram import LEVELS, combine, count_pixels
from salnet.metrics.inputs import Batch, Images, batches
from salnet.metrics.measures import curves_and_adaptive, mae, overlap_measures, s_measure
from salnet.metrics.msiou import MSIOU_THRESHOLDS, multiscale_iou
from salnet.metrics.names import FAMILIES, check_packages
from salnet.metrics.per_image import CURVE_TORCH_DTYPE, PerImage, summarise
from salnet.metrics.size_invariant import size_invariant
from salnet.metrics.weighted_f import weighted_f_measure

# Per family: the per-image quantities summed over images, and their lengths (names.py lists
# what compute() reports from them).
FIELDS = {
    "F": (("precision", LEVELS), ("recall", LEVELS), ("F", LEVELS), ("adpF", 1)),
    "E": (("E", LEVELS), ("adpE", 1)),
    "S": (("S", 1),),
    "wF": (("wF", 1),),
    "MAE": (("MAE", 1),),
    "IoU": (("IoU", LEVELS), ("adpIoU", 1)),
    "Dice": (("Dice", LEVELS), ("adpDice", 1)),
    "BER": (("BER", LEVELS), ("adpBER", 1)),
    "MSIoU": (("MSIoU", MSIOU_THRESHOLDS), ("adpMSIoU", 1)),
    "SI-MAE": (("SI-MAE", 1),),
    "SI-F": (("SI-maxF", 1), ("SI-meanF", 1), ("SI-adpF", 1)),
    "HCE": (("HCE", 1),),
}
assert tuple(FIELDS) == FAMILIES
# The families computed on the host, one image at a time (numpy, scipy, OpenCV).
HOST_FAMILIES = ("wF", "SI-MAE", "SI-F", "HCE")


class SODMetrics:
    """Accumulates the chosen metric families over images; sharded over ranks, `all_reduce()` then
    `compute()` gives what one process would have on all the images.

    metrics: the families to compute, among `FAMILIES` (F, E, S, wF, MAE, IoU, Dice, BER, MSIoU,
    SI-MAE, SI-F, HCE); a single name is one family. wF, SI-MAE, SI-F and HCE run on the host,
    one image at a time; HCE needs scikit-image (`MissingPackageError` names it).
    device: where the sums live; by default this rank's device (`salnet.dist.device()`), so that
    the all-reduce needs no copy. The metrics themselves run on the predictions' device.
    per_image: also keep every image's values with its key (`update(..., keys=...)`), on the host;
    `all_reduce()` gathers them from every rank and `per_image()` returns them sorted by key. Off
    by default: training's validation needs only the sums.
    """

    def __init__(
        self,
        metrics: Iterable[str] = ("F", "E", "S", "MAE"),
        device: str | torch.device | None = None,
        per_image: bool = False,
    ):
        chosen = {metrics} if isinstance(metrics, str) else set(metrics)
        unknown = sorted(chosen - set(FAMILIES))
        if unknown or not chosen:
            raise ValueError(f"metrics: {unknown or 'none chosen'}; choose among {', '.join(FAMILIES)}")
        check_packages(chosen)
        self.metrics = tuple(f for f in FAMILIES if f in chosen)
        self._slices: dict[str, slice] = {}
        start = 1  # element 0 counts the images
        for family in self.metrics:
            for name, length in FIELDS[family]:
                self._slices[name] = slice(start, start + length)
                start += length
        self._sums = torch.zeros(start, dtype=torch.float64, device=device if device is not None else dist.device())
        self.keeps_per_image = per_image
        self._rows: list[tuple[list[str], dict[str, torch.Tensor]]] = []  # (keys, {field: [B] or [B, L]}) per update

    @property
    def num_images(self) -> int:
        """Images counted so far (over all ranks after `all_reduce()`)."""
        return int(self._sums[0].item())

    def reset(self) -> None:
        self._sums.zero_()
        self._rows = []

    @torch.no_grad()
    def update(self, preds: Images, gts: Images, keys: list[str] | None = None) -> None:
        """Add images: `preds` are probabilities in [0, 1] (any float dtype, any device), `gts` masks
        of the same sizes (uint8 0..255 or another integer type, bool, or float in [0, 1]); each a
        batch [B, H, W] / [B, 1, H, W] or a list of [H, W] tensors, sizes may differ in a list.

        All inputs are checked before anything is added, so an error leaves the sums as they were.
        Each call has a fixed cost (about a millisecond on a CPU) on top of the per-pixel work:
        pass whole batches, or lists of many images, rather than one image at a time.
        `keys`: the images' names, one per image in order; required when keeping per-image values.
        """
        checked = batches(preds, gts)
        count = sum(b.levels.shape[0] for b in checked)
        if keys is not None and len(keys) != count:
            raise ValueError(f"update got {len(keys)} keys for {count} images: give one key per image")
        if self.keeps_per_image and keys is None:
            raise ValueError(
                "this SODMetrics keeps per-image values (per_image=True): update() needs keys=[one per image]"
            )
        if checked:
            per_image = self._per_image_values(checked)
            self._sums += self._summed(per_image, count).to(self._sums.device)
            if self.keeps_per_image:
                order = _grouped_order(preds)
                rows = {name: _compact(per_image[name]) for name in self._slices}
                self._rows.append(([keys[i] for i in order], rows))

    def all_reduce(self) -> None:
        """Sum the state over the default process group, in place (a no-op in a single process).

        Call it once, on every rank, after the last update: a second call would add again. With
        per-image values kept, every rank also receives every rank's rows (`per_image()`).
        """
        # nccl reduces CUDA tensors only, and the caller may have kept the sums on the host.
        on_wire = self._sums.to(dist.device()) if dist.backend() == "nccl" else self._sums
        dist.all_reduce_(on_wire, "sum")
        self._sums.copy_(on_wire)
        if self.keeps_per_image and dist.world_size() > 1:
            self._rows = [part for rows in dist.all_gather_object(self._rows) for part in rows]

    def per_image(self) -> PerImage:
        """Every image's values (after `all_reduce()`: of all ranks), sorted by key; see `PerImage`."""
        if not self.keeps_per_image:
            raise RuntimeError("this SODMetrics keeps no per-image values: create it with per_image=True")
        return PerImage.from_rows(self.metrics, self._rows)

    def compute(self) -> dict[str, float]:
        """Means over images, named as in `names.FAMILY_METRICS`: maxF, meanF, adpF (F); maxE, meanE,
        adpE (E); S; wF; MAE; and so on for the opt-in families."""
        return {name: value.item() for name, value in summarise(self._means(), self.metrics).items()}

    def curves(self) -> dict[str, list]:
        """Mean curves over images, 256 points in PySODMetrics' order: point i is threshold 255 - i
        (`threshold`, the 8-bit level a normalised prediction must reach to count as foreground).
        Keys: threshold, plus precision, recall, F with the F family and E with the E family."""
        means = self._means()
        out: dict[str, list] = {"threshold": list(range(LEVELS - 1, -1, -1))}
        for name in ("precision", "recall", "F", "E"):
            if name in means:
                out[name] = means[name].tolist()
        return out

    def state_dict(self) -> dict:
        """The families and the sums (on the CPU): enough to continue an interrupted evaluation."""
        return {"metrics": list(self.metrics), "sums": self._sums.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state.get("metrics", ())) != self.metrics:
            raise ValueError(
                f"state holds metrics {state.get('metrics')}, this SODMetrics computes {list(self.metrics)}"
            )
        sums = state["sums"]
        if sums.shape != self._sums.shape:
            raise ValueError(f"state sums have shape {tuple(sums.shape)}, expected {tuple(self._sums.shape)}")
        self._sums.copy_(sums)

    def _means(self) -> dict[str, torch.Tensor]:
        images = self._sums[0].item()
        if images == 0:
            raise RuntimeError("SODMetrics has counted no images: call update() (and all_reduce()) first")
        return {name: self._sums[where].cpu() / images for name, where in self._slices.items()}

    def _summed(self, per_image: dict[str, torch.Tensor], count: int) -> torch.Tensor:
        """The state vector's increment for one update's per-image values, on their device."""
        sums = torch.zeros(self._sums.shape, dtype=torch.float64, device=per_image[next(iter(self._slices))].device)
        sums[0] = count
        for name, where in self._slices.items():
            sums[where] = per_image[name].view(per_image[name].shape[0], -1).sum(0)
        return sums

    def _per_image_values(self, checked: list[Batch]) -> dict[str, torch.Tensor]:
        """Each image's values of the chosen families (the `FIELDS` names, [B] or [B, L] float64),
        on the predictions' device, in the order of `checked`."""
        h = combine([count_pixels(b.levels, b.foreground) for b in checked])
        chosen = set(self.metrics)
        per_image: dict[str, torch.Tensor] = {}
        if chosen & {"F", "E"}:
            per_image.update(curves_and_adaptive(h))
        if chosen & {"IoU", "Dice", "BER"}:
            per_image.update(overlap_measures(h))
        if "S" in chosen:
            per_image["S"] = s_measure(h)
        if "MAE" in chosen:
            per_image["MAE"] = mae(h)
        values = h.values.split([b.levels.shape[0] for b in checked])
        if "MSIoU" in chosen:
            per_image.update(_concat([multiscale_iou(b.levels, v, b.foreground) for b, v in zip(checked, values)]))
        host = [family for family in HOST_FAMILIES if family in chosen]
        if host:
            host_values = _concat([_host_metrics(host, b, v) for b, v in zip(checked, values)])
            per_image.update({name: v.to(h.values.device) for name, v in host_values.items()})
        return per_image


def _compact(values: torch.Tensor) -> torch.Tensor:
    """Per-image values as kept: on the host, curves in `PerImage`'s float32, scalars float64."""
    return values.to("cpu", CURVE_TORCH_DTYPE if values.dim() > 1 else torch.float64)


def _grouped_order(preds: Images) -> list[int]:
    """The images' indices in the order `batches()` returns them: a batch tensor as it is, a list
    grouped by size, the sizes in order of first appearance (its same-size stacking)."""
    if isinstance(preds, torch.Tensor):
        return list(range(preds.shape[0]))
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(preds):
        by_size.setdefault(tuple(p.shape[-2:]), []).append(i)
    return [i for members in by_size.values() for i in members]


def _host_metrics(families, batch: Batch, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The host families' per-image values for one same-size batch (float64 [B] each, on the host)."""
    if "HCE" in families:
        from salnet.metrics.hce import human_correction_effort  # scikit-image: imported only when chosen
    levels, level_values, masks = batch.levels.cpu().numpy(), values.cpu().numpy(), batch.foreground.cpu().numpy()
    out: dict[str, list[float]] = {}
    for i in range(levels.shape[0]):
        image = level_values[i].take(levels[i])  # the normalised prediction, float64 [H, W]
        if "wF" in families:
            out.setdefault("wF", []).append(weighted_f_measure(image, masks[i]))
        if "SI-MAE" in families or "SI-F" in families:
            for name, value in size_invariant(image, levels[i], level_values[i], masks[i], families).items():
                out.setdefault(name, []).append(value)
        if "HCE" in families:
            out.setdefault("HCE", []).append(human_correction_effort(image > 0.5, masks[i]))
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in out.items()}


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
