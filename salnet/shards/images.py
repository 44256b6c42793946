"""Decode, check and normalise one image and one mask, following fixed, documented rules.

Before anything is decoded, the pixel count is read from the header (salnet.imagecheck) and a
file above the limit (`--max-pixels`, default 64 MP) is refused, naming it and its size.

Images become 8-bit RGB:
- EXIF orientation is applied (the stored pixels are upright; `orig_size` is the upright size).
- L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB.
- Alpha (RGBA, LA, PA, P with transparency): flattened onto white, as a viewer shows it on a page.
- 16-bit (I;16*, I): value / 257, rounded (65535 -> 255), gray copied to R, G and B; a 16-bit
  RGB(A) PNG keeps the high byte of each channel (what Pillow decodes it to).
- Other modes (e.g. F, 32-bit float) are refused with the mode in the message.
- The source's bytes are kept when it already is an 8-bit RGB JPEG or PNG needing no rotation,
  resize or downscale. Otherwise it is re-encoded: JPEG sources as JPEG (quality 95, 4:4:4), all
  others losslessly as PNG.

Masks become one 8-bit channel. A mask is converted only where it has one right reading; every
conversion is counted in the manifest (`stats.mask_conversions`) and pack's summary:
- 1, L: as they are (1 -> 0/255).
- 16-bit (I;16*, I): kept if every value is <= 255 (8-bit values in a 16-bit file), otherwise
  value / 257, rounded.
- Grey stored as colour: RGB with R == G == B at every pixel, or a palette (P) whose colours in use
  are all grey: that grey.
- Alpha (LA, RGBA, PA, P with transparency), colours grey as above: grey x alpha / 255, i.e.
  flattened onto black: transparent means background.
- True colour (an RGB or palette mask with any non-grey pixel) has no one reading (which channel?
  any colour on black?) and is refused, naming the file, how many pixels are coloured and the
  first one; convert it to grey with the reading you intend, or leave it out with --skip-bad.
- Then a mask whose values are only 0 and 1 is multiplied by 255. Soft values are kept (metrics
  binarise later). Masks are always stored as PNG; an 8-bit gray PNG needing no change keeps its bytes.

`grey_levels` is that one-channel reading (everything above but the 0/1 scaling), and the only one
in salnet: pack reads masks with it, `salnet.evaluate` reads the masks and the saliency maps of
folders with it (a map's levels are kept as they are: 0/1 levels are a faint map, not a mask), and
shards hold only its result (an 8-bit grey PNG, all that verify and the loader accept). A file is
read whole only below a byte limit (`read_file`), and decoded only after its header's pixel count;
truncated or corrupt image data is refused, naming the file.

Image and mask must have the same upright size: otherwise `SizeMismatch`, which pack handles by
--on-mismatch (fail, skip, or resize: the image is resized to its mask's size with Lanczos, since
the mask is the ground truth). `--max-side` downscales both (image: Lanczos; mask: area average,
so edge pixels keep their foreground fraction).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from salnet.imagecheck import DEFAULT_MAX_PIXELS, ImageError, open_image, pillow_limit, read_header
from salnet.shards.format import JPEG_EXT, PNG_EXT
from salnet.shards.jpeg import JpegStructureError, check_jpeg
from salnet.shards.manifest import ShardsError

EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
IMAGE_MODES = {"RGB", "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"} | SIXTEEN_BIT_MODES | ALPHA_MODES
MASK_MODES = {"1", "L", "P", "RGB"} | SIXTEEN_BIT_MODES | ALPHA_MODES
REENCODE_JPEG = {"quality": 95, "subsampling": 0}
RESIZED_TO_MASK = "resized to its mask"  # the image conversion --on-mismatch resize records


class BadFileError(ShardsError):
    """A source file that cannot become a sample: corrupt, truncated, unsupported, mismatched."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class SizeMismatch(BadFileError):
    """Image and mask differ in upright size; pack's --on-mismatch decides (fail, skip, resize)."""


@dataclass
class PreparedImage:
    ext: str  # format.JPEG_EXT or format.PNG_EXT
    data: bytes
    orig_size: tuple[int, int]  # (H, W), upright (the mask's size if resized to it)
    stored_size: tuple[int, int]  # (H, W) after --max-side
    conversions: tuple[str, ...]  # empty: the source bytes were kept
    resized_from: tuple[int, int] | None = None  # (H, W) upright, when resized to its mask


@dataclass
class PreparedMask:
    data: bytes  # 8-bit grayscale PNG
    foreground: float
    soft: bool
    conversions: tuple[str, ...] = ()  # what was converted (module docstring); empty: kept as it was


def upright_size(data: bytes, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(H, W) after EXIF orientation, from the header (nothing decoded)."""
    return _upright(_open(data, path, max_pixels), path, max_pixels)


def prepare_image(
    data: bytes,
    path: str,
    max_side: int | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize_to: tuple[int, int] | None = None,
) -> PreparedImage:
    """The image as a shard stores it; `resize_to` (H, W): resize the upright image to that size if it differs."""
    im = _open(data, path, max_pixels)
    rotated = _orientation(im, path, max_pixels) in range(
        2, 9
    )  # 1 is upright; others are invalid and ignored, as exif_transpose does
    upright = _upright(im, path, max_pixels)
    resize = resize_to is not None and tuple(resize_to) != upright
    orig_size = tuple(resize_to) if resize else upright
    downscale = max_side is not None and max(orig_size) > max_side
    header = read_header(
        data, path
    )  # the bit depth Pillow does not expose (already read once by _open: it cannot fail)
    keep = (im.format == "JPEG" and im.mode == "RGB") or (
        header.format == "PNG" and (header.bit_depth, header.colour) == (8, "RGB")
    )
    ext = JPEG_EXT if im.format == "JPEG" else PNG_EXT  # kept or re-encoded, a JPEG stays a JPEG; all else is PNG
    if keep and not rotated and not resize and not downscale:
        _check_decodes(im, data, path, max_pixels)
        return PreparedImage(ext, data, orig_size, orig_size, ())

    conversions = []
    if rotated:
        conversions.append("exif-rotated")
    if im.mode != "RGB":
        conversions.append(f"mode {im.mode}")
    elif header.format == "PNG" and header.bit_depth != 8:
        conversions.append(f"{header.bit_depth}-bit RGB")
    if im.format not in ("JPEG", "PNG"):
        conversions.append(f"format {im.format}")
    if resize:
        conversions.append(RESIZED_TO_MASK)
    if downscale:
        conversions.append("downscaled")
    if im.mode not in IMAGE_MODES:
        raise BadFileError(path, f"unsupported image mode {im.mode}; valid modes: {', '.join(sorted(IMAGE_MODES))}")
    _load(im, path, max_pixels)
    rgb = _to_rgb(ImageOps.exif_transpose(im))
    if resize:
        rgb = rgb.resize(orig_size[::-1], Image.Resampling.LANCZOS)
    if downscale:
        rgb = rgb.resize(_fit(rgb.size, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if im.format == "JPEG":
        rgb.save(out, "JPEG", **REENCODE_JPEG)
    else:
        rgb.save(out, "PNG")
    return PreparedImage(
        ext, out.getvalue(), orig_size, rgb.size[::-1], tuple(conversions), upright if resize else None
    )


def prepare_mask(
    data: bytes,
    path: str,
    orig_size: tuple[int, int],
    stored_size: tuple[int, int],
    image_path: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedMask:
    height, width = upright_size(data, path, max_pixels)  # the header: a mismatch is found before decoding
    if (height, width) != tuple(orig_size):
        raise SizeMismatch(
            path,
            f"mask is {width}x{height} (WxH) but its image {image_path} is {orig_size[1]}x{orig_size[0]} "
            "(after EXIF orientation); they must match: pass --on-mismatch resize to resize the image "
            "to its mask (the mask is the ground truth), or --on-mismatch skip to leave such pairs out",
        )
    values, conversions = mask_levels(data, path, max_pixels)
    if stored_size != orig_size:
        values = np.asarray(Image.fromarray(values).resize(stored_size[::-1], Image.Resampling.BOX))
        conversions.append("downscaled")
    # Counting comparisons: several times faster than a histogram (np.bincount widens to int64).
    soft = np.count_nonzero(values == 0) + np.count_nonzero(values == 255) != values.size
    foreground = np.count_nonzero(values >= 128) / values.size
    header = read_header(data, path)
    if not conversions and (header.format, header.bit_depth, header.colour) == ("PNG", 8, "grey"):
        return PreparedMask(data, float(foreground), bool(soft))
    out = io.BytesIO()
    Image.fromarray(values).save(out, "PNG")  # uint8 2-D: mode L
    return PreparedMask(out.getvalue(), float(foreground), bool(soft), tuple(conversions))


def mask_levels(data: bytes, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """A ground-truth mask's 8-bit levels, upright [H, W], and the conversions that took: grey_levels,
    then 0/1 scaled to 0/255."""
    values, conversions = grey_levels(data, path, max_pixels)
    if values.max(initial=0) == 1:
        values = values * np.uint8(255)
        conversions.append("0/1 scaled to 0/255")
    return values, conversions


def grey_levels(
    data: bytes, path: str, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "mask"
) -> tuple[np.ndarray, list[str]]:
    """One 8-bit channel, upright [H, W], of a mask or saliency map (`what`) by the module docstring's
    rules, and the conversions that took. BadFileError naming `path`: too many pixels (from the header,
    before decoding), an unsupported mode, a colour image, truncated or corrupt data."""
    im = _open(data, path, max_pixels)
    if im.mode not in MASK_MODES:
        raise BadFileError(path, f"unsupported {what} mode {im.mode}; valid modes: {', '.join(sorted(MASK_MODES))}")
    source_format = im.format
    _load(im, path, max_pixels)
    conversions = []
    if _orientation(im, path, max_pixels) in range(2, 9):
        im = ImageOps.exif_transpose(im)
        conversions.append("exif-rotated")
    if source_format != "PNG":
        conversions.append(f"format {source_format}")
    values, how = _mask_values(im, path, what)
    return values, conversions + how


def read_file(path: str, max_bytes: int, limit_hint: str, shown_as: str | None = None) -> bytes:
    """The bytes of a source file, read only if it holds at most `max_bytes` (checked before reading:
    a 2 GiB file named .jpg is refused, not read); BadFileError naming the file otherwise.
    `limit_hint` says what the limit is and how to raise it."""
    shown_as = shown_as or path
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise BadFileError(
                    shown_as, f"the file is {size} bytes, above the limit of {max_bytes} bytes {limit_hint}"
                )
            return f.read()
    except OSError as e:
        raise BadFileError(shown_as, f"cannot read the file: {e.strerror or e}") from None


def _open(data: bytes, path: str, max_pixels: int) -> Image.Image:
    try:
        return open_image(data, path, max_pixels)  # the header's pixel count first, nothing decoded
    except ImageError as e:
        raise BadFileError(path, e.reason) from None


def _load(im: Image.Image, path: str, max_pixels: int) -> None:
    try:
        with pillow_limit(max_pixels):  # some Pillow plugins check again while loading
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # "image file is truncated", "broken data stream", bad Huffman tables, ...
        raise BadFileError(path, f"corrupt or truncated image data: {e}") from None


def _orientation(im: Image.Image, path: str, max_pixels: int) -> int:
    try:
        with pillow_limit(max_pixels):  # Pillow decodes a PNG to find an eXIf chunk after its image data
            return im.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadFileError(path, f"corrupt or truncated image data: {e}") from None


def _upright(im: Image.Image, path: str, max_pixels: int) -> tuple[int, int]:
    """(H, W) once EXIF orientation is applied: orientations 5..8 swap the axes."""
    width, height = im.size
    return (width, height) if _orientation(im, path, max_pixels) in range(5, 9) else (height, width)


def _check_decodes(im: Image.Image, data: bytes, path: str, max_pixels: int) -> None:
    """Prove that bytes kept as they are will decode. A JPEG needs no pixel decode for that (see jpeg.py)."""
    if im.format != "JPEG":
        _load(im, path, max_pixels)
        return
    try:
        check_jpeg(data)
    except JpegStructureError as e:
        raise BadFileError(path, f"corrupt or truncated JPEG: {e}") from None


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


def _mask_values(im: Image.Image, path: str, what: str) -> tuple[np.ndarray, list[str]]:
    """The mask's one 8-bit channel, and the conversions that took (module docstring's rules)."""
    if im.mode in SIXTEEN_BIT_MODES:
        raw = np.asarray(im, dtype=np.int64)
        return (raw.clip(0, 255).astype(np.uint8) if raw.max(initial=0) <= 255 else _sixteen_to_eight(im)), ["16-bit"]
    if im.mode in ("1", "L"):
        return (np.asarray(im), []) if im.mode == "L" else (np.asarray(im.convert("L")), ["mode 1"])
    alpha = im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)
    if im.mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"))
        grey, opacity, how = la[..., 0], la[..., 1], []
    else:
        pixels = np.asarray(im.convert("RGBA" if alpha else "RGB"))
        opacity = pixels[..., 3] if alpha else None
        kind = "palette" if im.mode in ("P", "PA") else "RGB"
        _refuse_colour(pixels[..., :3], opacity, path, kind, what)
        grey, how = pixels[..., 0], [f"grey {kind}"]
    if opacity is None:
        return grey, how
    return ((grey.astype(np.uint16) * opacity + 127) // 255).astype(np.uint8), how + ["alpha"]


def _refuse_colour(rgb: np.ndarray, opacity: np.ndarray | None, path: str, kind: str, what: str) -> None:
    """BadFileError unless every visible pixel is grey (R == G == B): colour has no one reading as a mask or map."""
    coloured = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])
    if opacity is not None:
        coloured &= opacity > 0  # a fully transparent pixel's colour is not seen; it reads as background
    count = int(np.count_nonzero(coloured))
    if not count:
        return
    y, x = divmod(int(np.flatnonzero(coloured)[0]), coloured.shape[1])
    raise BadFileError(
        path,
        f"the {what} is in colour ({kind}: {count} of {coloured.size} pixels are not grey, the first "
        f"at x={x}, y={y} is RGB{tuple(int(v) for v in rgb[y, x])}); a colour {what} has no one reading "
        "(which channel? any colour on black?), so it is refused: convert it to grey with the reading "
        "you intend (e.g. PIL's Image.convert('L'), or one channel), or pass --skip-bad to leave it out",
    )
