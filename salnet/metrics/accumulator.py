"""`SODMetrics`: per-image metrics summed into one float64 vector that an all-reduce merges."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from salnet import dist
from salnet.metrics.histogram import LEVELS, combine, count_pixels
from salnet.metrics.inputs import Batch, Images, batches
from salnet.metrics.measures import curves_and_adaptive, mae, s_measure
from salnet.metrics.names import FAMILIES, FAMILY_METRICS
from salnet.metrics.weighted_f import weighted_f_measure

# Per family: the per-image quantities summed over images, and their lengths (names.py lists
# what compute() reports from them).
FIELDS = {
    "F": (("precision", LEVELS), ("recall", LEVELS), ("F", LEVELS), ("adpF", 1)),
    "E": (("E", LEVELS), ("adpE", 1)),
    "S": (("S", 1),),
    "wF": (("wF", 1),),
    "MAE": (("MAE", 1),),
}
assert tuple(FIELDS) == FAMILIES


class SODMetrics:
    """Accumulates F, E, S, wF and MAE over images; sharded over ranks, `all_reduce()` then
    `compute()` gives what one process would have on all the images.

    metrics: the families to compute, among F, E, S, wF, MAE (wF is the slow one: it needs a
    distance transform on the host); a single name is one family.
    device: where the sums live; by default this rank's device (`salnet.dist.device()`), so that
    the all-reduce needs no copy. The metrics themselves run on the predictions' device.
    """

    def __init__(self, metrics: Iterable[str] = ("F", "E", "S", "MAE"), device: str | torch.device | None = None):
        chosen = {metrics} if isinstance(metrics, str) else set(metrics)
        unknown = sorted(chosen - set(FAMILIES))
        if unknown or not chosen:
            raise ValueError(f"metrics: {unknown or 'none chosen'}; choose among {', '.join(FAMILIES)}")
        self.metrics = tuple(f for f in FAMILIES if f in chosen)
        self._slices: dict[str, slice] = {}
        start = 1  # element 0 counts the images
        for family in self.metrics:
            for name, length in FIELDS[family]:
                self._slices[name] = slice(start, start + length)
                start += length
        self._sums = torch.zeros(start, dtype=torch.float64, device=device if device is not None else dist.device())

    @property
    def num_images(self) -> int:
        """Images counted so far (over all ranks after `all_reduce()`)."""
        return int(self._sums[0].item())

    def reset(self) -> None:
        self._sums.zero_()

    @torch.no_grad()
    def update(self, preds: Images, gts: Images) -> None:
        """Add images: `preds` are probabilities in [0, 1] (any float dtype, any device), `gts` masks
        of the same sizes (uint8 0..255 or another integer type, bool, or float in [0, 1]); each a
        batch [B, H, W] / [B, 1, H, W] or a list of [H, W] tensors, sizes may differ in a list.

        All inputs are checked before anything is added, so an error leaves the sums as they were.
        Each call has a fixed cost (about a millisecond on a CPU) on top of the per-pixel work:
        pass whole batches, or lists of many images, rather than one image at a time.
        """
        checked = batches(preds, gts)
        if checked:
            self._sums += self._update_sums(checked).to(self._sums.device)

    def all_reduce(self) -> None:
        """Sum the state over the default process group, in place (a no-op in a single process).

        Call it once, on every rank, after the last update: a second call would add again.
        """
        # nccl reduces CUDA tensors only, and the caller may have kept the sums on the host.
        on_wire = self._sums.to(dist.device()) if dist.backend() == "nccl" else self._sums
        dist.all_reduce_(on_wire, "sum")
        self._sums.copy_(on_wire)

    def compute(self) -> dict[str, float]:
        """Means over images: maxF, meanF, adpF (F); maxE, meanE, adpE (E); S; wF; MAE."""
        means = self._means()
        out = {}
        for family in self.metrics:
            for name in FAMILY_METRICS[family]:
                if name.startswith(("max", "mean")):  # the best and the mean point of a curve
                    curve = means[name.removeprefix("max").removeprefix("mean")]
                    out[name] = (curve.max() if name.startswith("max") else curve.mean()).item()
                else:
                    out[name] = means[name].item()
        return out

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

    def _update_sums(self, checked: list[Batch]) -> torch.Tensor:
        """The state vector's increment for one update, on the predictions' device."""
        h = combine([count_pixels(b.levels, b.foreground) for b in checked])
        per_image: dict[str, torch.Tensor] = {}
        if "F" in self.metrics or "E" in self.metrics:
            per_image.update(curves_and_adaptive(h))
        if "S" in self.metrics:
            per_image["S"] = s_measure(h)
        if "MAE" in self.metrics:
            per_image["MAE"] = mae(h)
        if "wF" in self.metrics:
            values = h.values.split([b.levels.shape[0] for b in checked])
            per_image["wF"] = torch.cat(
                [weighted_f_measure(b.levels, v, b.foreground).to(h.values.device) for b, v in zip(checked, values)]
            )
        sums = torch.zeros(self._sums.shape, dtype=torch.float64, device=h.counts.device)
        sums[0] = h.counts.shape[0]
        for name, where in self._slices.items():
            sums[where] = per_image[name].view(per_image[name].shape[0], -1).sum(0)
        return sums
