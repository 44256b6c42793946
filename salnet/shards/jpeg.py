"""Check a JPEG without decoding its pixels: the structure by a walk, the headers by libjpeg.

Decoding a JPEG with libjpeg (behind Pillow and torchvision) fails only on structure and headers:
a truncated file, a malformed marker segment, invalid frame, scan or Huffman-table parameters.
Damage inside the entropy-coded data yields wrong pixels and a warning, never an error. So

1. a walk over the marker segments catches truncation and broken segments at memory speed: SOI;
   segments whose lengths fit the file; scan data holding 0xFF only as stuffed 0xFF00 or RST0-7;
   at least one SOS; EOI (bytes after EOI are ignored, as decoders ignore them);
2. libjpeg itself then checks every header: it decodes, at 1/8 scale, the file with the
   entropy-coded data cut out, so it parses SOF, DQT, DHT and every scan's SOS (progression
   parameters included) and builds the Huffman tables exactly as for the real image, with no
   data to decode (empty scans are only a warning to it).

Together they reject every damaged file a full Pillow decode rejects, at a small fraction of its
cost (tests/test_shards_images.py compares the two on many damaged files); that is what lets
`pack` keep a JPEG's bytes after checking it.
"""

from __future__ import annotations

import io

from PIL import Image

EOI, SOS = 0xD9, 0xDA
STANDALONE = set(range(0xD0, 0xD8)) | {0x01}  # RST0-7 and TEM carry no length


class JpegStructureError(ValueError):
    """What is wrong with the file, and where."""


def check_jpeg(data: bytes) -> None:
    """Raise JpegStructureError saying what is wrong and where; return None for a sound file."""
    headers_only = _segments_without_scan_data(data) + b"\xff\xd9"
    try:
        with Image.open(io.BytesIO(headers_only)) as im:
            im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise JpegStructureError(f"invalid JPEG headers: {e}") from None


def _segments_without_scan_data(data: bytes) -> bytes:
    """Walk the markers, checking the structure; return SOI and every marker segment (all scans'
    headers included, for progressive files) without the entropy-coded data and EOI."""
    if data[:2] != b"\xff\xd8":
        raise JpegStructureError("no JPEG start-of-image marker")
    segments, pos, scans, size = [data[:2]], 2, 0, len(data)
    while True:
        if pos + 2 > size:
            raise JpegStructureError(f"truncated: the file ends at byte {size} before its end-of-image marker")
        if data[pos] != 0xFF:
            raise JpegStructureError(f"expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        while pos + 1 < size and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        start, marker = pos, (data[pos + 1] if pos + 1 < size else None)
        pos += 2
        if marker == EOI:
            break
        if marker in STANDALONE:
            continue
        if marker is None or pos + 2 > size:
            raise JpegStructureError(f"truncated: the file ends at byte {size} inside a marker")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > size:
            raise JpegStructureError(
                f"truncated or corrupt: segment 0x{marker:02x} at byte {start} claims {length} bytes, "
                f"the file has {size - pos} left"
            )
        pos += length
        segments.append(data[start:pos])
        if marker == SOS:
            scans += 1
            pos = _end_of_scan(data, pos)
    if scans == 0:
        raise JpegStructureError("no image data (no start-of-scan marker before the end-of-image marker)")
    return b"".join(segments)


def _end_of_scan(data: bytes, pos: int) -> int:
    """Offset of the marker that ends the scan data starting at `pos`: the first 0xFF that is
    neither stuffing (FF00), a restart marker (FFD0-FFD7) nor fill before a marker (FFFF)."""
    size = len(data)
    while (pos := data.find(b"\xff", pos)) != -1 and pos + 1 < size:
        following = data[pos + 1]
        if following == 0xFF:
            pos += 1
        elif following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
        else:
            return pos
    raise JpegStructureError(
        f"truncated: the scan data runs to the end of the file (byte {size}) without an end-of-image marker"
    )
