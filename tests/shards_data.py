"""Test helpers for the shards tests: small real image/mask files on disk, and reading shards back."""

from __future__ import annotations

import glob
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

EXIF_ORIENTATION = 0x0112


def scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image with a coloured rectangle on a gradient, and the rectangle's 0/255 mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full((h, w), 60)], -1).astype(np.uint8)
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask = np.zeros((h, w), np.uint8)
    mask[top:top + h // 3, left:left + w // 3] = 255
    rgb[mask > 0] = rng.integers(0, 256, 3)
    return rgb, mask


def write_pair(image_path: Path, mask_path: Path, h: int = 48, w: int = 64, seed: int = 0) -> None:
    rgb, mask = scene(h, w, seed)
    save(Image.fromarray(rgb), image_path)
    save(Image.fromarray(mask), mask_path)


def save(im: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}[path.suffix.lower()]
    if fmt == "JPEG":
        kwargs.setdefault("quality", 95)
    im.save(path, fmt, **kwargs)
    return path


def make_folder_dataset(image_dir: Path, mask_dir: Path, stems: list[str], image_ext: str = ".jpg", h: int = 48, w: int = 64) -> None:
    for i, stem in enumerate(stems):
        write_pair(image_dir / f"{stem}{image_ext}", mask_dir / f"{stem}.png", h, w, seed=i)


def read_samples(shard_dir: Path) -> list[dict]:
    """Every sample of a shard dir through plain webdataset (no salnet code), in shard order."""
    urls = sorted(glob.glob(str(shard_dir / "*.tar")))
    assert urls, f"no shards in {shard_dir}"
    return list(wds.WebDataset(urls, shardshuffle=False))


def decoded(sample: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image HxWx3, mask HxW, meta) of one webdataset sample."""
    image_bytes = sample.get("jpg", sample.get("png"))
    image = Image.open(io.BytesIO(image_bytes))
    mask = Image.open(io.BytesIO(sample["mask.png"]))
    assert image.mode == "RGB" and mask.mode == "L", (image.mode, mask.mode)
    return np.asarray(image), np.asarray(mask), json.loads(sample["json"])


def by_source(shard_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """Decoded samples keyed by their source file name."""
    result = {}
    for sample in read_samples(shard_dir):
        image, mask, meta = decoded(sample)
        result[Path(meta["source"]).name] = (image, mask, meta)
    return result


def write_png_rgb16(path: Path, rgb16: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG, which Pillow cannot write: IHDR, one zlib IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path
