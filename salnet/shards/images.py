"""Decode, check and normalise one image and one mask, following fixed, documented rules.

Images become 8-bit RGB:
- EXIF orientation is applied (the stored pixels are upright; `orig_size` is the upright size).
- L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB.
- Alpha (RGBA, LA, PA, P with transparency): flattened onto white, as a viewer shows it on a page.
- 16-bit (I;16*, I): value / 257, rounded (65535 -> 255), gray copied to R, G and B; a 16-bit
  RGB(A) PNG keeps the high byte of each channel (what Pillow decodes it to).
- Other modes (e.g. F, 32-bit float) are refused with the mode in the message.
- The source's bytes are kept when it already is an 8-bit RGB JPEG or PNG needing no rotation or
  downscale. Otherwise it is re-encoded: JPEG sources as JPEG (quality 95, 4:4:4), all others
  losslessly as PNG.

Masks become one 8-bit channel:
- 1, L: as they are (1 -> 0/255). 16-bit: kept if every value is <= 255 (8-bit values in a
  16-bit file), otherwise value / 257, rounded.
- RGB: the brightest channel (any colour on black is foreground; gray stays gray).
- Alpha (RGBA, LA, P/PA with transparency): brightest colour channel x alpha / 255, i.e.
  flattened onto black: transparent means background.
- Then a mask whose values are only 0 and 1 is multiplied by 255. Soft values are kept (metrics
  binarise later). Masks are always stored as PNG; an 8-bit gray PNG needing no change keeps its bytes.

Image and mask must have the same upright size. `--max-side` downscales both (image: Lanczos;
mask: area average, so edge pixels keep their foreground fraction).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from salnet.shards.format import JPEG_EXT, PNG_EXT
from salnet.shards.jpeg import JpegStructureError, check_jpeg
from salnet.shards.manifest import ShardsError

EXIF_ORIENTATION = 0x0112
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_GRAY, PNG_RGB = 0, 2  # IHDR colour types
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
IMAGE_MODES = {"RGB", "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"} | SIXTEEN_BIT_MODES | ALPHA_MODES
MASK_MODES = {"1", "L", "P", "RGB"} | SIXTEEN_BIT_MODES | ALPHA_MODES
REENCODE_JPEG = {"quality": 95, "subsampling": 0}


class BadFileError(ShardsError):
    """A source file that cannot become a sample: corrupt, truncated, unsupported, mismatched."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class PreparedImage:
    ext: str  # format.JPEG_EXT or format.PNG_EXT
    data: bytes
    orig_size: tuple[int, int]  # (H, W), upright
    stored_size: tuple[int, int]  # (H, W) after --max-side
    conversions: tuple[str, ...]  # empty: the source bytes were kept


@dataclass
class PreparedMask:
    data: bytes  # 8-bit grayscale PNG
    foreground: float
    soft: bool


def prepare_image(data: bytes, path: str, max_side: int | None) -> PreparedImage:
    im = _open(data, path)
    width, height = im.size
    orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    rotated = orientation in range(2, 9)  # 1 is upright; other values are invalid and ignored, as exif_transpose does
    orig_size = (width, height) if orientation in range(5, 9) else (height, width)  # 5..8 swap the axes
    downscale = max_side is not None and max(width, height) > max_side
    depth = _png_header(data)
    keep = (im.format == "JPEG" and im.mode == "RGB") or (im.format == "PNG" and depth == (8, PNG_RGB))
    ext = JPEG_EXT if im.format == "JPEG" else PNG_EXT  # kept or re-encoded, a JPEG stays a JPEG; all else is PNG
    if keep and not rotated and not downscale:
        _check_decodes(im, data, path)
        return PreparedImage(ext, data, orig_size, orig_size, ())

    conversions = []
    if rotated:
        conversions.append("exif-rotated")
    if im.mode != "RGB":
        conversions.append(f"mode {im.mode}")
    elif depth is not None and depth[0] != 8:
        conversions.append(f"{depth[0]}-bit RGB")
    if im.format not in ("JPEG", "PNG"):
        conversions.append(f"format {im.format}")
    if downscale:
        conversions.append("downscaled")
    if im.mode not in IMAGE_MODES:
        raise BadFileError(path, f"unsupported image mode {im.mode}; valid modes: {', '.join(sorted(IMAGE_MODES))}")
    _load(im, path)
    rgb = _to_rgb(ImageOps.exif_transpose(im))
    if downscale:
        rgb = rgb.resize(_fit(rgb.size, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if im.format == "JPEG":
        rgb.save(out, "JPEG", **REENCODE_JPEG)
    else:
        rgb.save(out, "PNG")
    return PreparedImage(ext, out.getvalue(), orig_size, rgb.size[::-1], tuple(conversions))


def prepare_mask(data: bytes, path: str, orig_size: tuple[int, int], stored_size: tuple[int, int], image_path: str) -> PreparedMask:
    im = _open(data, path)
    if im.mode not in MASK_MODES:
        raise BadFileError(path, f"unsupported mask mode {im.mode}; valid modes: {', '.join(sorted(MASK_MODES))}")
    _load(im, path)
    rotated = im.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9)
    if rotated:
        im = ImageOps.exif_transpose(im)
    if im.size[::-1] != orig_size:
        raise BadFileError(path, f"mask is {im.size[0]}x{im.size[1]} (WxH) but its image {image_path} is "
                                 f"{orig_size[1]}x{orig_size[0]} (after EXIF orientation); they must match")
    values = _mask_values(im)
    binary01 = values.max(initial=0) == 1
    if binary01:
        values = values * np.uint8(255)
    resized = stored_size != orig_size
    if resized:
        values = np.asarray(Image.fromarray(values).resize(stored_size[::-1], Image.Resampling.BOX))
    # Counting comparisons: several times faster than a histogram (np.bincount widens to int64).
    soft = np.count_nonzero(values == 0) + np.count_nonzero(values == 255) != values.size
    foreground = np.count_nonzero(values >= 128) / values.size
    if im.format == "PNG" and _png_header(data) == (8, PNG_GRAY) and not (rotated or binary01 or resized):
        return PreparedMask(data, float(foreground), bool(soft))
    out = io.BytesIO()
    Image.fromarray(values).save(out, "PNG")  # uint8 2-D: mode L
    return PreparedMask(out.getvalue(), float(foreground), bool(soft))


def _open(data: bytes, path: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadFileError(path, "not an image file Pillow can read (corrupt header or unknown format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadFileError(path, f"cannot open image: {e}") from None


def _load(im: Image.Image, path: str) -> None:
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # "image file is truncated", "broken data stream", bad Huffman tables, ...
        raise BadFileError(path, f"corrupt or truncated image data: {e}") from None


def _check_decodes(im: Image.Image, data: bytes, path: str) -> None:
    """Prove that bytes kept as they are will decode. A JPEG needs no pixel decode for that (see jpeg.py)."""
    if im.format != "JPEG":
        _load(im, path)
        return
    try:
        check_jpeg(data)
    except JpegStructureError as e:
        raise BadFileError(path, f"corrupt or truncated JPEG: {e}") from None


def _png_header(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, which Pillow does not expose; None if not PNG."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 26:
        return None
    return data[24], data[25]


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _sixteen_to_eight(im: Image.Image) -> np.ndarray:
    values = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(_sixteen_to_eight(im)).convert("RGB")
    if im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _mask_values(im: Image.Image) -> np.ndarray:
    if im.mode in SIXTEEN_BIT_MODES:
        raw = np.asarray(im, dtype=np.int64)
        return raw.clip(0, 255).astype(np.uint8) if raw.max(initial=0) <= 255 else _sixteen_to_eight(im)
    if im.mode in ("1", "L"):
        return np.asarray(im if im.mode == "L" else im.convert("L"))
    if im.mode == "RGB":
        return np.asarray(im).max(axis=2)
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
    return ((rgba[..., :3].max(axis=2) * rgba[..., 3] + 127) // 255).astype(np.uint8)
