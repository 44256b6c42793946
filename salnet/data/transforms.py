"""Decode, and turn uint8 batches into network input.

Workers decode with torchvision.io (faster than PIL); the training augmentation is augment.py's.
Batches leave the workers as uint8 (a quarter of float32's bytes through shared memory and
host-to-device copies). Conversion to float and normalisation happen on the device, in
`to_model_input` / `normalise` / `to_target`.
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg, decode_png
from torchvision.transforms import v2

from salnet.data.reader import RawSample
from salnet.imagecheck import ImageError, check_shard_member
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
        raise SampleError(
            f"{raw.where()}: no mask member ({member_name('KEY', MASK_EXT)}); members: {sorted(raw.members)}"
        )
    image = _decode(raw, image_ext, _DECODERS[READABLE_IMAGE_EXTS[image_ext]], ImageReadMode.RGB)
    mask = _decode(raw, MASK_EXT, decode_png, ImageReadMode.GRAY)
    if image.shape[-2:] != mask.shape[-2:]:
        raise SampleError(
            f"{raw.where()}: image is {tuple(image.shape[-2:])} (HxW) but its mask is {tuple(mask.shape[-2:])}"
        )
    return image, mask


def _decode(raw: RawSample, ext: str, decoder, mode: ImageReadMode) -> torch.Tensor:
    data = raw.members[ext]
    try:  # the header first: nothing above data.max_pixels is decoded, nothing but what a shard may hold
        check_shard_member(
            data, f"{raw.where()}: member {member_name('KEY', ext)}", raw.max_pixels, mask=ext == MASK_EXT
        )
    except ImageError as e:
        raise SampleError(str(e)) from None
    try:
        # bytearray: torch.frombuffer needs a writable buffer (a bytes object would warn).
        return decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as e:
        raise SampleError(
            f"{raw.where()}: member {member_name('KEY', ext)} ({len(data)} bytes) does not decode: {e}"
        ) from None


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
    return normalise(images.to(torch.device(device), non_blocking=True), channels_last)


def normalise(images: torch.Tensor, channels_last: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in 0..255 (uint8 or float) -> float32 ImageNet-normalised, on their device,
    written into `out` if given, else into a new tensor NHWC in memory if `channels_last`.

    One pass: the dtype conversion, the normalisation and the change of memory layout happen in the
    same kernel, because the result's strides are chosen before it is computed."""
    if out is None:
        out = torch.empty(
            images.shape,
            dtype=torch.float32,
            device=images.device,
            memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        )
    scale, shift = _normaliser(images.device)
    return torch.addcmul(-shift, images, scale, out=out)


def to_target(masks: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 masks [B, 1, H, W] (0..255) -> float32 in [0, 1] on `device` (soft values kept)."""
    return masks.to(torch.device(device), non_blocking=True).float().div_(255)
