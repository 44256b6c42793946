"""The training augmentation: one set of maths, run in a loader worker or on the device (data.augment_on).

Per sample: a random scale-crop box (torchvision's RandomResizedCrop draw, cut at integer pixels),
the crop's scale to the training size, a horizontal flip and a rotation, composed into ONE affine
map and applied to image and mask together by one bilinear `grid_sample` (one interpolation, where
RandomResizedCrop followed by RandomRotation resampled twice); then brightness, contrast and
saturation jitter on the image as one colour transform.

    box = crop_box(image, aug)                 # worker, in the per-batch seeded RNG stream
    image, mask = cut(image, mask, box, size)  # worker: a view, or an integer box-filter reduction
    warp = draw_warp(n, aug, generator)        # worker (augment_on=worker) or TrainInput's generator (device)
    image, mask = warp_batch(images, masks, extent, size, warp)  # device: float 0..255, the whole batch at once
    augment_sample(image, mask, warp, out_image, out_mask)      # worker: the same maps in uint8 (OpenCV)

The two modes draw the same parameters from the same distributions and apply the same maps
(`_affine`); they differ in where the warp runs, in its arithmetic (float grid_sample on the
device; OpenCV's uint8 fixed-point bilinear in a worker, within 3 grey levels of it, at a third of
its CPU time), and in who draws the parameters (a generator seeded per batch from the plan in the
worker; TrainInput's per-rank generator, kept in checkpoints, on the device).

Choices, and why:
- Crops of different sizes travel zero-padded at the bottom/right to the batch's largest crop,
  with their extent: padding is a copy, where resizing in the worker would be a second
  interpolation and cost what the warp costs. Bilinear taps beyond the crop then read zeros,
  exactly as they read grid_sample's zero padding when the worker warps the bare crop.
- A crop at least twice the training size along an axis is first reduced by an integer box
  filter (kh x kw pixel means): the bilinear warp alone would alias at such a downscale (it reads
  2 x 2 taps), and the handover shrinks with it. Typical SOD images (~400 px, trained at 352) never
  take this path.
- The mask is resampled bilinearly like the image, as probabilities: it stays aligned with the
  image to sub-pixel accuracy, soft labels stay soft, every value stays in [0, 255] (a convex
  combination of stored values), and pixels rotated in from outside the crop are background (0),
  as the image's are black. Hard masks get interpolated values along their edges (as F3Net's
  loader makes them); nearest sampling would keep them hard but move edges by up to half a pixel.
- Colour: the factors are drawn as torchvision's ColorJitter draws them (uniform in [max(0, 1-j),
  1+j]). Without the clamping torchvision applies after each of the three operations they commute,
  so their random order has no effect and is not drawn: they compose into one per-image affine
  colour map (brightness b, contrast c around the grey mean mu, saturation s):
      out = b*c*s * x + b*c*(1-s) * grey(x) + b*(1-c) * mu,   clamped to [0, 255] once.
  One pass instead of three; values differ from torchvision's only where an intermediate result
  would have left [0, 255].
- Geometry as torchvision's: rotation about the image centre, positive angles counter-clockwise,
  zero fill (black image, background mask); the scale maps corner pixel centres onto corner pixel
  centres (see warp_grid), so no output pixel reads outside its crop unless rotated out of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from salnet.config import AugmentConfig, DataConfig

# OpenCV (the worker-side warp) without its thread pool, set before any call creates one: a pool
# running in the process that forks the DataLoader workers leaves them a lock that no thread
# will release (the loader hung). Each worker is one core's worth of work anyway.
cv2.setNumThreads(1)

GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


def resolve_augment_on(cfg: DataConfig, device: torch.device | str) -> str:
    """data.augment_on, with its default (null) resolved for the training device: device on CUDA, worker elsewhere."""
    if cfg.augment_on is not None:
        return cfg.augment_on
    return "device" if torch.device(device).type == "cuda" else "worker"


class Box(NamedTuple):
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Warp:
    """The per-sample parameters drawn after the crop box, for a batch of n samples."""

    flip: torch.Tensor  # bool [n]: mirror left-right
    angle: torch.Tensor  # float32 [n]: degrees, counter-clockwise
    colour: torch.Tensor | None  # float32 [n, 3]: brightness, contrast, saturation factors; None: no jitter

    def to(self, device: torch.device) -> Warp:
        return Warp(
            *(None if t is None else t.to(device, non_blocking=True) for t in (self.flip, self.angle, self.colour))
        )

    def select(self, rows: slice) -> Warp:
        return Warp(*(None if t is None else t[rows] for t in (self.flip, self.angle, self.colour)))


def crop_box(image: torch.Tensor, aug: AugmentConfig) -> Box:
    """torchvision's RandomResizedCrop box (area fraction in aug.scale, aspect ratio in 3/4..4/3),
    drawn from torch's global RNG (the worker seeds it per batch)."""
    return Box(*RandomResizedCrop.get_params(image, list(aug.scale), list(CROP_RATIO)))


def draw_warp(n: int, aug: AugmentConfig, generator: torch.Generator | None = None) -> Warp:
    """Flip (p = 0.5), angle (uniform in +-aug.rotate_deg) and colour factors (uniform in
    [max(0, 1 - j), 1 + j], j = aug.color_jitter) of n samples; torch's global RNG without `generator`."""
    flip = torch.rand(n, generator=generator) < 0.5 if aug.hflip else torch.zeros(n, dtype=torch.bool)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * aug.rotate_deg if aug.rotate_deg > 0 else torch.zeros(n)
    j = aug.color_jitter
    colour = torch.empty(n, 3).uniform_(max(0.0, 1 - j), 1 + j, generator=generator) if j > 0 else None
    return Warp(flip, angle, colour)


def cut(image: torch.Tensor, mask: torch.Tensor, box: Box, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of image [3, H, W] and mask [1, H, W] (uint8): a view, or, where the box is at least
    twice `size` along an axis, its integer box-filter reduction (uint8 too)."""
    image = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
    mask = mask[:, box.top : box.top + box.height, box.left : box.left + box.width]
    kh, kw = max(1, box.height // size), max(1, box.width // size)
    if kh == kw == 1:
        return image, mask
    pooled = F.avg_pool2d(torch.cat([image, mask]).float(), (kh, kw)).round_().to(torch.uint8)
    return pooled[:3], pooled[3:]


def pad_crops(images: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crops of different sizes as one batch: (image uint8 [B, 3, Hp, Wp], mask uint8 [B, 1, Hp, Wp],
    extent int64 [B, 2]), each crop at the top left of zeros, (Hp, Wp) the largest height and width."""
    extent = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
    height, width = extent.max(0).values.tolist()
    out_images = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
    out_masks = torch.zeros(len(images), 1, height, width, dtype=torch.uint8)
    for i, (image, mask) in enumerate(zip(images, masks)):
        out_images[i, :, : image.shape[1], : image.shape[2]] = image
        out_masks[i, :, : mask.shape[1], : mask.shape[2]] = mask
    return out_images, out_masks, extent


def _affine(extent: torch.Tensor, padded: tuple[int, int], size: int, warp: Warp) -> tuple[torch.Tensor, ...]:
    """The map from output to source in grid_sample's normalised coordinates (see warp_grid), as the
    rows (ax, bx, cx) and (ay, by, cy) of x = ax * u + bx * v + cx, y = ay * u + by * v + cy: [B] each."""
    if size < 2:
        raise ValueError(f"the training size must be at least 2 pixels, got {size}")
    device = extent.device
    theta = warp.angle.to(device, torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(theta), torch.sin(theta)
    sign = 1 - 2 * warp.flip.to(device, torch.float32)
    extent = extent.to(torch.float32)
    height, width = padded
    # (w - 1) * S / ((S - 1) * Wp): pixel-centre to pixel-centre scale, in normalised units.
    sy = (extent[:, 0] - 1) * (size / (size - 1)) / height
    sx = (extent[:, 1] - 1) * (size / (size - 1)) / width
    return (sx * sign * cos, -sx * sign * sin, extent[:, 1] / width - 1, sy * sin, sy * cos, extent[:, 0] / height - 1)


def warp_grid(extent: torch.Tensor, padded: tuple[int, int], size: int, warp: Warp) -> torch.Tensor:
    """grid_sample's grid [B, size, size, 2]: output pixel -> its source in the padded crops.

    In normalised output coordinates (u, v) in [-1, 1] (align_corners=False), undo the rotation
    (about the centre), undo the flip, then scale onto the crop's extent (h, w) at the top left of
    the (Hp, Wp) tensor so that the outermost output pixel centres land on the crop's outermost
    pixel centres: an upscaled crop then reads no zeros along its rim (with half-pixel alignment
    its outer half pixel would blend with the padding), at a scale of (w - 1) / (S - 1) instead of
    w / S (0.05% apart at 300 -> 352 px).
    """
    device = extent.device
    # Rows of the affine map (u, v, 1) -> (x, y), one per sample, shaped to broadcast over [B, S(v), S(u)].
    ax, bx, cx, ay, by, cy = (t.view(-1, 1, 1) for t in _affine(extent, padded, size, warp))
    axis = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres in [-1, 1]
    u, v = axis.view(1, 1, size), axis.view(1, size, 1)
    # x and y as two planes, handed over as a [B, S, S, 2] view: F.affine_grid (a batched matmul with
    # K = 3) and stacking into the interleaved layout each cost several times this on CPU.
    grid = torch.empty(extent.shape[0], 2, size, size, device=device)
    torch.addcmul(bx * v + cx, ax, u, out=grid[:, 0])
    torch.addcmul(by * v + cy, ay, u, out=grid[:, 1])
    return grid.permute(0, 2, 3, 1)


def pixel_affine(height: int, width: int, size: int, warp: Warp) -> np.ndarray:
    """warp_grid's map for one bare crop of height x width, in pixel units: the 2 x 3 matrix taking an
    output pixel (column j, row i) to its source (x, y) in the crop, pixel centres at integers (what
    OpenCV's warpAffine takes with WARP_INVERSE_MAP).

    grid_sample's u = (2j + 1) / S - 1 and x_pixel = ((x + 1) * w - 1) / 2 (align_corners=False),
    composed with the normalised rows."""
    ax, bx, cx, ay, by, cy = (
        float(t[0]) for t in _affine(torch.tensor([[height, width]]), (height, width), size, warp)
    )
    half = 1 / size - 1  # u (or v) of pixel 0
    return np.array(
        [
            [width * ax / size, width * bx / size, width / 2 * ((ax + bx) * half + cx + 1) - 0.5],
            [height * ay / size, height * by / size, height / 2 * ((ay + by) * half + cy + 1) - 0.5],
        ]
    )


def jitter(images: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation of float images [B, 3, H, W] in 0..255 as one colour map
    (see the module's docstring), clamped to [0, 255]."""
    b, c, s = (f.view(-1, 1, 1, 1) for f in colour.to(images.device, images.dtype).unbind(1))
    r, g, bl = images.unbind(1)
    grey = (r * GREY[0]).add_(g, alpha=GREY[1]).add_(bl, alpha=GREY[2]).unsqueeze(1)  # [B, 1, H, W]
    mean = grey.mean(dim=(2, 3), keepdim=True)
    bc = b * c
    return torch.addcmul(grey.mul_(bc * (1 - s)).add_(b * (1 - c) * mean), images, bc * s).clamp_(0, 255)


def warp_batch(
    images: torch.Tensor, masks: torch.Tensor, extent: torch.Tensor, size: int, warp: Warp
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded uint8 crops (image [B, 3, Hp, Wp], mask [B, 1, Hp, Wp], extent [B, 2]) -> image and
    mask float [B, C, size, size] in 0..255, warped (one bilinear grid_sample of both) and jittered."""
    x = torch.empty(images.shape[0], 4, *images.shape[-2:], dtype=torch.float32, device=images.device)
    x[:, :3].copy_(images)  # the uint8 -> float conversion, written where the mask joins it
    x[:, 3:].copy_(masks)
    out = F.grid_sample(
        x,
        warp_grid(extent, tuple(images.shape[-2:]), size, warp),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    image, mask = out[:, :3], out[:, 3:]
    return (image if warp.colour is None else jitter(image, warp.colour)), mask


def augment_sample(
    image: torch.Tensor, mask: torch.Tensor, warp: Warp, out_image: torch.Tensor, out_mask: torch.Tensor
) -> None:
    """One cut sample (uint8 [3, h, w], [1, h, w]) warped and jittered into uint8 `out_image` [3, S, S]
    and `out_mask` [1, S, S] (rows of the batch: no stacking afterwards), for augment_on=worker.

    The same maps as warp_batch's and jitter's, computed by OpenCV in uint8: the warp is fixed-point
    bilinear (1/32 pixel steps), the colour map one weighted sum per plane with a uint8 grey plane
    (values within a grey level of jitter's). A CPU core does both in about a third of the time
    of the float path. Plane by plane: a cut crop is a strided view of its planes, read in place,
    and each plane is written straight into its output row."""
    size = out_image.shape[-1]
    matrix = pixel_affine(*image.shape[-2:], size, warp)
    for source, target in zip((*image, *mask), (*out_image, *out_mask)):
        cv2.warpAffine(
            source.numpy(),
            matrix,
            (size, size),
            dst=target.numpy(),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
    if warp.colour is not None:
        b, c, s = warp.colour[0].tolist()
        r, g, bl = (plane.numpy() for plane in out_image)
        grey = cv2.addWeighted(
            cv2.addWeighted(r, GREY[0], g, GREY[1], 0.0, dtype=cv2.CV_32F), 1.0, bl.astype(np.float32), GREY[2], 0.0
        )
        mean = float(grey.mean())
        for plane in (r, g, bl):
            cv2.addWeighted(
                plane.astype(np.float32),
                b * c * s,
                grey,
                b * c * (1 - s),
                b * (1 - c) * mean,
                dst=plane,
                dtype=cv2.CV_8U,
            )
