"""Look at an image's header before anything decodes it: its size, and whether salnet may decode it.

A PNG of half a megabyte can decode to 144 megapixels (0.4 GB as 8-bit RGB, several GB once the
loader turns it into tensors). Every place that decodes an image (pack, verify, the loader,
predict, evaluate's folders) first reads the size from the header, which costs microseconds and
no pixel memory, and refuses more than `limit` pixels with a message naming the file or sample and its size:

    image_size(data, where) -> (width, height)       the header only
    check_pixels(data, where, limit) -> Header        ImageError (TooManyPixels) above the limit
    check_size((width, height), where, limit)         the same limit for a size from elsewhere
    check_shard_member(data, where, limit, mask=...)  also: what a shard stores (8-bit; masks 8-bit grey PNG)
    open_image(data, where, limit) -> PIL image       checked, then opened lazily for a Pillow decode

PNG (IHDR) and JPEG (the SOF marker) headers are parsed here; other formats (BMP, TIFF, WebP,
...; only `pack` reads them) through Pillow's lazy `Image.open`, which reads the header only.
Pillow's own decompression-bomb limit (a warning above 89 MP, an error above 179 MP) is set to
this one while salnet opens and decodes (`pillow_limit`), so raising `limit` is all a genuinely
large image needs. No torch here: the packing
tools and the loader's workers both import it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # well above the high-resolution SOD sets (HRSOD, UHRSD: <= 8.3 MP)
RAISE_HINT = (
    "if the image is genuine, raise the limit (pack, verify, predict, evaluate: --max-pixels N; "
    "training: data.max_pixels=N)"
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOURS = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}  # IHDR colour type -> name
JPEG_SOI = b"\xff\xd8"
JPEG_SOF = {
    0xC0,
    0xC1,
    0xC2,
    0xC3,
    0xC5,
    0xC6,
    0xC7,
    0xC9,
    0xCA,
    0xCB,
    0xCD,
    0xCE,
    0xCF,
}  # frame headers (not DHT C4, JPG C8, DAC CC)
JPEG_STANDALONE = set(range(0xD0, 0xD8)) | {0x01}  # RST0-7 and TEM carry no length
JPEG_EOI, JPEG_SOS = 0xD9, 0xDA
JPEG_COLOURS = {1: "grey", 3: "YCbCr", 4: "CMYK"}  # by component count


class ImageError(ValueError):
    """An image refused before decoding: an unreadable header, too many pixels, or not what a shard holds."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


class TooManyPixels(ImageError):
    """The header declares more pixels than the limit."""

    def __init__(self, where: str, size: tuple[int, int], limit: int, channels: int):
        width, height = size
        gib = width * height * channels / 2**30
        super().__init__(
            where,
            f"{width}x{height} pixels ({_mp(width * height)}) is above the limit of {_mp(limit)} "
            f"({limit} pixels), checked before decoding (decoded it would take {gib:.1f} GiB); {RAISE_HINT}",
        )
        self.size, self.limit = size, limit


@dataclass(frozen=True)
class Header:
    format: str  # "PNG", "JPEG", or Pillow's format name
    width: int
    height: int
    bit_depth: int | None = None  # PNG: bits per sample; JPEG: sample precision; None: not read (other formats)
    colour: str | None = None  # PNG: PNG_COLOURS; JPEG: JPEG_COLOURS; other formats: Pillow's mode

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def channels(self) -> int:
        """Bytes per pixel once decoded to 8 bits (at least 3: decoders usually make RGB)."""
        return 4 if self.colour in ("RGBA", "CMYK") else 3

    def describe(self) -> str:
        depth = f"{self.bit_depth}-bit " if self.bit_depth else ""
        return f"{depth}{self.colour or ''} {self.format}".replace("  ", " ").strip()


def read_header(data: bytes, where: str) -> Header:
    """The header of an encoded image; ImageError if it is not a readable image header."""
    if data[:8] == PNG_SIGNATURE:
        return _png_header(data, where)
    if data[:2] == JPEG_SOI:
        return _jpeg_header(data, where)
    with pillow_limit(None):  # this module's limit applies to the size it returns
        try:
            with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header, decodes nothing
                return Header(im.format or "unknown", im.size[0], im.size[1], None, im.mode)
        except UnidentifiedImageError:
            raise ImageError(where, "not an image file Pillow can read (corrupt header or unknown format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(where, f"cannot read the image header: {e}") from None


def image_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) as the header declares it (before any EXIF orientation)."""
    header = read_header(data, where)
    return header.width, header.height


def check_pixels(data: bytes, where: str, limit: int = DEFAULT_MAX_PIXELS) -> Header:
    """The header, if the image has at most `limit` pixels; TooManyPixels naming `where` and the size otherwise."""
    header = read_header(data, where)
    check_size((header.width, header.height), where, limit, header.channels)
    return header


def check_size(size: tuple[int, int], where: str, limit: int = DEFAULT_MAX_PIXELS, channels: int = 3) -> None:
    """TooManyPixels unless width x height is at most `limit`: the one pixel rule, for a size a header
    declares or one stored elsewhere (a shard sample's orig_size, which predict allocates a map for)."""
    if size[0] * size[1] > limit:
        raise TooManyPixels(where, size, limit, channels)


def check_shard_member(data: bytes, where: str, limit: int = DEFAULT_MAX_PIXELS, *, mask: bool) -> Header:
    """check_pixels, and that the bytes are what a shard holds (salnet.shards.format): an 8-bit JPEG
    or PNG image, or an 8-bit grey PNG mask. Anything else would decode to other dtypes or
    channels (a 16-bit PNG to uint16, an RGB mask through a grey conversion to 0.3 for red)."""
    header = check_pixels(data, where, limit)
    repack = (
        "repack the source with `python -m salnet.shards pack`, which converts 16-bit, grey-as-RGB and grey "
        "palette masks to 8-bit grey and refuses colour ones"
    )
    if mask and (header.format != "PNG" or header.bit_depth != 8 or header.colour != "grey"):
        raise ImageError(where, f"the mask is {_a(header.describe())}; a shard's mask is an 8-bit grey PNG: {repack}")
    if not mask and (header.format not in ("PNG", "JPEG") or (header.bit_depth or 8) > 8):
        raise ImageError(
            where,
            f"the image is {_a(header.describe())}; a shard's image is an 8-bit JPEG or PNG: "
            "repack the source with `python -m salnet.shards pack`, which converts it",
        )
    return header


def open_image(data: bytes, where: str, limit: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Pillow's lazy image of `data` (header read, no pixels decoded), after check_pixels.

    Pillow's own decompression-bomb check is set to `limit` for the open, so it agrees with this one.
    """
    check_pixels(data, where, limit)
    with pillow_limit(limit):
        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(where, "not an image file Pillow can read (corrupt header or unknown format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(where, f"cannot open image: {e}") from None


def parse_pixels(text: str) -> int:
    """'64M', '100000000', '1.5G' -> pixels (K, M, G are powers of 1000, as in 'megapixel')."""
    text = text.strip()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise ValueError(
            f"pixel count {text!r} is not a number with an optional K, M or G (e.g. 64M, 100000000)"
        ) from None
    if value < 1:
        raise ValueError(f"pixel count {text!r} must be at least 1")
    return value


def _png_header(data: bytes, where: str) -> Header:
    if len(data) < 26 or data[12:16] != b"IHDR":
        raise ImageError(where, "corrupt PNG: no IHDR header after the signature")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    if width == 0 or height == 0 or colour not in PNG_COLOURS:
        raise ImageError(where, f"corrupt PNG header: {width}x{height} pixels, colour type {colour}")
    return Header("PNG", width, height, depth, PNG_COLOURS[colour])


def _jpeg_header(data: bytes, where: str) -> Header:
    """Walk the marker segments to the frame header (SOF); lengths only, no entropy-coded data is read."""
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            raise ImageError(where, f"corrupt JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (JPEG_SOS, JPEG_EOI):
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in JPEG_SOF:
            if length < 8 or pos + 2 + length > size:
                break
            precision = data[pos + 4]
            height, width = (
                int.from_bytes(data[pos + 5 : pos + 7], "big"),
                int.from_bytes(data[pos + 7 : pos + 9], "big"),
            )
            if width == 0 or height == 0:
                raise ImageError(
                    where,
                    f"JPEG frame header declares {width}x{height} pixels (a height set later by a DNL "
                    "marker is not supported)",
                )
            return Header(
                "JPEG", width, height, precision, JPEG_COLOURS.get(data[pos + 9], f"{data[pos + 9]}-component")
            )
        if length < 2:
            break
        pos += 2 + length
    raise ImageError(where, "corrupt or truncated JPEG: no frame header (SOF marker) before the image data")


@contextmanager
def pillow_limit(limit: int | None) -> Iterator[None]:
    """Pillow's own decompression-bomb check (a warning above its MAX_IMAGE_PIXELS, an error above twice
    that) set to `limit` (None: off) for the block: images within this module's limit then pass
    Pillow's check without a warning, whatever the limit was raised to. Process-wide while it lasts."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _a(text: str) -> str:
    """'an 8-bit RGB PNG', 'a 16-bit grey PNG', 'an RGB BMP'."""
    spoken_vowel = text[:1].lower() in tuple("aeio8") or text.startswith(("11", "18", "RGB", "L ", "LA "))
    return f"{'an' if spoken_vowel else 'a'} {text}"


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"
