"""salnet.imagecheck: sizes from headers (PNG, JPEG, and Pillow's formats), the pixel limit, what a
shard may hold, and Pillow's own bomb limit kept in step."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from salnet.imagecheck import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    TooManyPixels,
    check_pixels,
    check_shard_member,
    image_size,
    open_image,
    parse_pixels,
    read_header,
)

from shards_data import png_bomb


def encoded(im: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


def png_header_only(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose chunks are right but whose image data is empty: all a header check may look at."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is patched to claim another size."""
    data = bytearray(encoded(Image.new("RGB", (16, 8)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
SAMPLES = {
    "png rgb": encoded(Image.fromarray(rgb), "PNG"),
    "png grey": encoded(Image.fromarray(rgb[..., 0]), "PNG"),
    "png palette": encoded(Image.fromarray(rgb).quantize(16), "PNG"),
    "png rgba": encoded(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "PNG"),
    "png 16-bit": encoded(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
    "jpeg": encoded(Image.fromarray(rgb), "JPEG"),
    "jpeg progressive": encoded(Image.fromarray(rgb), "JPEG", progressive=True),
    "jpeg grey": encoded(Image.fromarray(rgb[..., 0]), "JPEG"),
    "jpeg cmyk": encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
    "jpeg exif": encoded(Image.fromarray(rgb), "JPEG", exif=Image.Exif().tobytes()),
    "bmp": encoded(Image.fromarray(rgb), "BMP"),
    "tiff": encoded(Image.fromarray(rgb), "TIFF"),
    "webp": encoded(Image.fromarray(rgb), "WEBP"),
}


@pytest.mark.parametrize("kind", SAMPLES)
def test_the_size_from_the_header_is_pillows_size(kind):
    assert image_size(SAMPLES[kind], kind) == (53, 37) == Image.open(io.BytesIO(SAMPLES[kind])).size


def test_headers_say_format_depth_and_colour():
    assert read_header(SAMPLES["png rgb"], "x").describe() == "8-bit RGB PNG"
    assert read_header(SAMPLES["png 16-bit"], "x").describe() == "16-bit grey PNG"
    assert read_header(SAMPLES["png palette"], "x").colour == "palette"
    assert read_header(SAMPLES["jpeg grey"], "x").describe() == "8-bit grey JPEG"
    assert read_header(SAMPLES["jpeg cmyk"], "x").colour == "CMYK"
    assert read_header(SAMPLES["bmp"], "x").format == "BMP"


def test_the_144_megapixel_png_of_half_a_megabyte_is_refused_naming_it_and_its_size():
    bomb = png_bomb(12000, 12000)
    assert len(bomb) < 2**19
    with pytest.raises(TooManyPixels) as err:
        check_pixels(bomb, "img/huge.png")
    message = str(err.value)
    assert message.startswith(
        "img/huge.png: 12000x12000 pixels (144.0 MP) is above the limit of 64.0 MP (64000000 pixels)"
    )
    assert "--max-pixels" in message and "data.max_pixels" in message
    assert err.value.size == (12000, 12000) and err.value.limit == DEFAULT_MAX_PIXELS
    assert check_pixels(bomb, "img/huge.png", limit=144_000_000).pixels == 144_000_000  # the limit can be raised


def test_a_jpeg_frame_header_claiming_65535_squared_is_refused():
    data = jpeg_claiming(65535, 65535)
    assert len(data) < 1000
    with pytest.raises(TooManyPixels, match=r"x.jpg: 65535x65535 pixels \(4294.8 MP\)"):
        check_pixels(data, "x.jpg")


def test_unreadable_headers_are_errors_naming_the_file():
    cases = [
        (b"", "not an image file Pillow can read"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "corrupt PNG: no IHDR"),
        (png_header_only(0, 10), "corrupt PNG header: 0x10 pixels"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 8 + b"\xff\xda", "no frame header"),
        (b"\xff\xd8\xff\xe0\xff\xff", "no frame header"),  # a segment longer than the file
        (jpeg_claiming(16, 0), "DNL marker is not supported"),
        (np.random.default_rng(1).bytes(500), "not an image file Pillow can read"),
    ]
    for data, expected in cases:
        with pytest.raises(ImageError, match=expected) as err:
            image_size(data, "where/it.is")
        assert str(err.value).startswith("where/it.is: ")


def test_a_shard_member_must_be_what_pack_writes():
    check_shard_member(SAMPLES["jpeg"], "k.jpg", mask=False)
    check_shard_member(SAMPLES["png rgb"], "k.png", mask=False)
    check_shard_member(SAMPLES["png grey"], "k.mask.png", mask=True)
    refused = [
        (SAMPLES["png 16-bit"], False, "the image is a 16-bit grey PNG; a shard's image is an 8-bit JPEG or PNG"),
        (SAMPLES["bmp"], False, "the image is an RGB BMP"),
        (SAMPLES["png 16-bit"], True, "the mask is a 16-bit grey PNG; a shard's mask is an 8-bit grey PNG: repack"),
        (SAMPLES["png rgb"], True, "the mask is an 8-bit RGB PNG"),
        (SAMPLES["png palette"], True, "the mask is a 4-bit palette PNG"),
        (SAMPLES["jpeg grey"], True, "the mask is an 8-bit grey JPEG"),
    ]
    for data, mask, expected in refused:
        with pytest.raises(ImageError, match=expected):
            check_shard_member(data, "member", mask=mask)
    with pytest.raises(TooManyPixels):
        check_shard_member(png_header_only(9000, 9000, colour=0), "k.mask.png", mask=True)


def test_pillows_own_bomb_limit_follows_ours_and_is_restored():
    saved = Image.MAX_IMAGE_PIXELS
    huge = png_header_only(15000, 15000)  # 225 MP: above Pillow's error threshold (2 x 89.5 MP)
    with pytest.raises(TooManyPixels):
        open_image(huge, "x.png")
    im = open_image(huge, "x.png", limit=300_000_000)  # lazily opened: raising our limit is all it takes
    assert im.size == (15000, 15000)
    assert Image.MAX_IMAGE_PIXELS == saved


def test_parse_pixels():
    assert parse_pixels("64M") == 64_000_000 and parse_pixels("1.5G") == 1_500_000_000 and parse_pixels("5000") == 5000
    for bad in ("", "lots", "-3", "0"):
        with pytest.raises(ValueError, match="pixel count"):
            parse_pixels(bad)
