"""Decode, augment, and turn uint8 batches into network input.

Workers decode with torchvision.io (faster than PIL) and augment image and mask together with
transforms.v2 on tv_tensors, so one random draw moves both; batches leave the workers as uint8
(a quarter of float32's bytes through shared memory and host-to-device copies). Conversion to
float and normalisation happen on the device, in `to_model_input` / `to_target`.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg, decode_png
from torchvision.transforms import v2

from salnet.config import AugmentConfig
from salnet.data.reader import RawSample
from salnet.shards.format import IMAGE_EXTS, MASK_EXT, READABLE_IMAGE_EXTS, member_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DECODERS = {"jpeg": decode_jpeg, "png": decode_png}  # by codec (format.READABLE_IMAGE_EXTS)


class SampleError(ValueError):
    """One corrupt sample; data.on_error decides whether it stops the run or is skipped."""


def decode_sample(raw: RawSample) -> tuple[torch.Tensor, torch.Tensor]:
    """(image uint8 [3, H, W], mask uint8 [1, H, W]) of a raw sample, or SampleError naming shard and key."""
    image_ext = next((ext for ext in READABLE_IMAGE_EXTS if ext in raw.members), None)
    if image_ext is None:
        wanted = " or ".join(member_name("KEY", ext) for ext in IMAGE_EXTS)
        raise SampleError(f"{raw.where()}: no image member ({wanted}); members: {sorted(raw.members)}")
    if MASK_EXT not in raw.members:
        raise SampleError(f"{raw.where()}: no mask member ({member_name('KEY', MASK_EXT)}); members: {sorted(raw.members)}")
    image = _decode(raw, image_ext, _DECODERS[READABLE_IMAGE_EXTS[image_ext]], ImageReadMode.RGB)
    mask = _decode(raw, MASK_EXT, decode_png, ImageReadMode.GRAY)
    if image.shape[-2:] != mask.shape[-2:]:
        raise SampleError(f"{raw.where()}: image is {tuple(image.shape[-2:])} (HxW) but its mask is {tuple(mask.shape[-2:])}")
    return image, mask


def _decode(raw: RawSample, ext: str, decoder, mode: ImageReadMode) -> torch.Tensor:
    data = raw.members[ext]
    try:
        # bytearray: torch.frombuffer needs a writable buffer (a bytes object would warn).
        return decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as e:
        raise SampleError(f"{raw.where()}: member {member_name('KEY', ext)} ({len(data)} bytes) does not decode: {e}") from None


class TrainAugment:
    """Joint image/mask augmentation to a square `size` chosen per call (one per batch in multi-scale mode)."""

    def __init__(self, aug: AugmentConfig):
        self.aug = aug
        self._by_size: dict[int, v2.Compose] = {}

    def pipeline(self, size: int) -> v2.Compose:
        if size not in self._by_size:
            aug = self.aug
            # Crop and resize first (torchvision's fast uint8 path): the steps after it then work on
            # size x size pixels, whatever the source size.
            steps = [v2.RandomResizedCrop((size, size), scale=aug.scale, antialias=True)]
            if aug.hflip:
                steps.append(v2.RandomHorizontalFlip())
            float_steps = []
            if aug.rotate_deg > 0:
                # Nearest (torchvision's default). fill=None pads with zeros (black image, background mask)
                # and skips v2's extra fill-blending pass, which costs more than the rotation itself.
                float_steps.append(v2.RandomRotation(aug.rotate_deg, fill=None))
            if aug.color_jitter > 0:
                # v2 colour transforms leave tv_tensors.Mask untouched: the image only.
                float_steps.append(v2.ColorJitter(brightness=aug.color_jitter, contrast=aug.color_jitter, saturation=aug.color_jitter))
            if float_steps:
                # Rotation and jitter compute in float anyway: one conversion each way instead of one
                # per operation (measured ~15% less time per sample). Masks stay uint8.
                steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), *float_steps,
                          v2.ToDtype({tv_tensors.Image: torch.uint8, "others": None}, scale=True)]
            self._by_size[size] = v2.Compose(steps)
        return self._by_size[size]

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        out_image, out_mask = self.pipeline(size)(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)


def resize_for_eval(image: torch.Tensor, size: int) -> torch.Tensor:
    return v2.functional.resize(image, [size, size], antialias=True)


_NORMALISE_CACHE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normaliser(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # (x / 255 - mean) / std == x * scale - shift, one fused pass on the device.
    if device not in _NORMALISE_CACHE:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        _NORMALISE_CACHE[device] = ((1 / (255 * std)).to(device), (mean / std).to(device))
    return _NORMALISE_CACHE[device]


def to_model_input(images: torch.Tensor, device: torch.device | str, channels_last: bool) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 on `device`, ImageNet-normalised, NHWC in memory if `channels_last`."""
    device = torch.device(device)
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)  # on uint8: a quarter of the bytes to move
    scale, shift = _normaliser(device)
    return torch.addcmul(-shift, images.float(), scale)  # keeps the memory format of `images`


def to_target(masks: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 masks [B, 1, H, W] (0..255) -> float32 in [0, 1] on `device` (soft values kept)."""
    return masks.to(torch.device(device), non_blocking=True).float().div_(255)
