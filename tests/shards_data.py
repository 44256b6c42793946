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
    mask[top : top + h // 3, left : left + w // 3] = 255
    rgb[mask > 0] = rng.integers(0, 256, 3)
    return rgb, mask


def write_pair(image_path: Path, mask_path: Path, h: int = 48, w: int = 64, seed: int = 0) -> None:
    rgb, mask = scene(h, w, seed)
    save(Image.fromarray(rgb), image_path)
    save(Image.fromarray(mask), mask_path)


def save(im: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}[
        path.suffix.lower()
    ]
    if fmt == "JPEG":
        kwargs.setdefault("quality", 95)
    im.save(path, fmt, **kwargs)
    return path


def make_folder_dataset(
    image_dir: Path, mask_dir: Path, stems: list[str], image_ext: str = ".jpg", h: int = 48, w: int = 64
) -> None:
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
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit RGB PNG of width x height black pixels that is small on disk (12000 x 12000:
    144 megapixels, 0.4 GB decoded, 0.4 MB encoded). Written without ever holding the pixels: one
    row-block is deflated with a full flush, which makes its compressed bytes independent of what
    came before, so the same bytes repeat for every block."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows_per_block = next(n for n in (100, 50, 10, 1) if height % n == 0)
    block = (b"\x00" + bytes(3 * width)) * rows_per_block  # filter byte 0, then the row's pixels
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; the zlib header and checksum are added below
    body = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    blocks = height // rows_per_block
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    stream = b"\x78\xda" + body * blocks + deflate.flush(zlib.Z_FINISH) + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


def write_raw_shards(
    out_dir: Path, samples: list[tuple[str, str, bytes, bytes]], name: str = "raw", shard_samples: int | None = None
) -> dict:
    """Shards holding exactly the given (key, image_ext, image_bytes, mask_bytes), unchecked: what
    another WebDataset writer (or an attacker) could produce. Returns the manifest."""
    from salnet.imagecheck import image_size
    from salnet.shards.format import sample_meta
    from salnet.shards.writer import Sample, ShardWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out_dir, name, shard_samples, None) as writer:
        for key, ext, image, mask in samples:
            size = image_size(image, key)[::-1]
            meta = sample_meta(
                key=key, dataset=name, source=f"{key}.{ext}", mask_source=f"{key}.png", orig_size=size, stored_size=size
            )
            writer.add(
                Sample(key=key, image_ext=ext, image=image, mask=mask, meta=meta, foreground=0.0, soft_mask=False)
            )
        return writer.finish(layout="test", command="tests/shards_data.write_raw_shards", skipped=[])


def edit_manifest(shard_dir: Path, edit) -> dict:
    """Apply `edit(manifest)` (in place) to shard_dir/manifest.json and write it back as it is (no checks)."""
    path = shard_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return manifest


def replace_shard(shard_dir: Path, file: str, data: bytes) -> None:
    """Put `data` in place of a shard and make the manifest agree on its size and hash, so only its content is wrong."""
    import hashlib

    (shard_dir / file).write_bytes(data)

    def update(manifest):
        for shard in manifest["shards"]:
            if shard["file"] == file:
                shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        manifest["total_bytes"] = sum(s["bytes"] for s in manifest["shards"])

    edit_manifest(shard_dir, update)


def rename_members(shard_dir: Path, file: str, rename) -> None:
    """Rewrite a shard with each member renamed to `rename(index, name)` (index: the member's number
    in the tar), data unchanged, and make the manifest agree on its size and hash: what another tar
    writer, or a hand-edited shard, could hold."""
    import tarfile

    out = io.BytesIO()
    with tarfile.open(shard_dir / file) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for index, info in enumerate(src.getmembers()):
            data = src.extractfile(info).read()
            info.name = rename(index, info.name)
            dst.addfile(info, io.BytesIO(data))
    replace_shard(shard_dir, file, out.getvalue())
