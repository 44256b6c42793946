"""Image and mask rules: modes, 16-bit, alpha, EXIF, kept bytes, downscaling, and bad files."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from salnet.shards.manifest import ShardsError
from salnet.shards.pack import pack

from shards_data import EXIF_ORIENTATION, by_source, read_samples, save, scene, write_pair, write_png_rgb16


def pack_folder(tmp_path, **kwargs):
    return pack(tmp_path / "src", tmp_path / "out", images="img", masks="gt", workers=1, **kwargs)


def add(tmp_path, name: str, image: Image.Image, mask: Image.Image, mask_name: str = None, **save_kwargs):
    save(image, tmp_path / "src" / "img" / name, **save_kwargs)
    save(mask, tmp_path / "src" / "gt" / (mask_name or name.rsplit(".", 1)[0] + ".png"))


def test_image_modes_become_8bit_rgb_by_the_documented_rules(tmp_path):
    rgb, mask = scene(32, 40, seed=1)
    m = Image.fromarray(mask)
    gray = np.arange(32 * 40, dtype=np.uint8).reshape(32, 40)
    add(tmp_path, "gray.png", Image.fromarray(gray), m)
    add(tmp_path, "cmyk.jpg", Image.new("CMYK", (40, 32), (0, 0, 0, 0)), m)  # no ink: white
    add(tmp_path, "palette.png", Image.fromarray(rgb).quantize(8), m)
    rgba = np.dstack([rgb, np.full((32, 40), 255, np.uint8)])
    rgba[:, :10, 3] = 0  # transparent strip: flattened onto white
    add(tmp_path, "alpha.png", Image.fromarray(rgba), m)
    sixteen = np.zeros((32, 40), np.uint16)
    sixteen[:, 20:] = 65535
    sixteen[:, 30:] = 32896  # 32896 / 257 = 128
    add(tmp_path, "sixteen.png", Image.fromarray(sixteen), m)
    rgb16 = rgb.astype(np.uint16) * 256 + 200  # high byte == the 8-bit value
    write_png_rgb16(tmp_path / "src" / "img" / "deep.png", rgb16)
    save(m, tmp_path / "src" / "gt" / "deep.png")
    manifest = pack_folder(tmp_path)
    out = by_source(tmp_path / "out")

    assert (out["gray.png"][0] == gray[..., None]).all()
    assert out["cmyk.jpg"][0].min() >= 250
    assert (out["palette.png"][0] == np.asarray(Image.fromarray(rgb).quantize(8).convert("RGB"))).all()
    assert (out["alpha.png"][0][:, :10] == 255).all() and (out["alpha.png"][0][:, 10:] == rgb[:, 10:]).all()
    assert (out["sixteen.png"][0][:, :20] == 0).all() and (out["sixteen.png"][0][:, 20:30] == 255).all()
    assert (out["sixteen.png"][0][:, 30:] == 128).all()
    assert (out["deep.png"][0] == rgb).all()
    assert manifest["stats"]["images_kept_original"] == 0
    assert set(manifest["stats"]["image_conversions"]) == {
        "mode L",
        "mode CMYK",
        "mode P",
        "mode RGBA",
        "mode I;16",
        "16-bit RGB",
    }


def test_mask_modes_become_one_8bit_channel_by_the_documented_rules(tmp_path):
    rgb, mask = scene(24, 24, seed=2)
    img = Image.fromarray(rgb)
    binary = mask > 0
    add(tmp_path, "zero_one.jpg", img, Image.fromarray(binary.astype(np.uint8)))
    add(tmp_path, "mode1.jpg", img, Image.fromarray(binary))
    add(tmp_path, "grey_rgb.jpg", img, Image.fromarray(np.dstack([mask] * 3)))  # grey stored as RGB
    white_on_clear = np.full((24, 24, 4), 255, np.uint8)
    white_on_clear[~binary, 3] = 0  # transparent background, white colour everywhere
    add(tmp_path, "alpha.jpg", img, Image.fromarray(white_on_clear))
    add(tmp_path, "sixteen.jpg", img, Image.fromarray(binary.astype(np.uint16) * 65535))
    add(tmp_path, "sixteen_small.jpg", img, Image.fromarray(binary.astype(np.uint16) * 255))
    add(tmp_path, "palette.jpg", img, Image.fromarray(mask).convert("P"))
    soft = mask.copy()
    soft[0, :3] = [100, 1, 254]
    add(tmp_path, "soft.jpg", img, Image.fromarray(soft))
    manifest = pack_folder(tmp_path)
    out = by_source(tmp_path / "out")

    for name in [
        "zero_one.jpg",
        "mode1.jpg",
        "grey_rgb.jpg",
        "alpha.jpg",
        "sixteen.jpg",
        "sixteen_small.jpg",
        "palette.jpg",
    ]:
        assert (out[name][1] == mask).all(), name
    assert (out["soft.jpg"][1] == soft).all()  # soft values kept as they are
    assert manifest["stats"]["soft_masks"] == 1
    assert manifest["stats"]["images_kept_original"] == 8  # the masks changed, the JPEGs did not
    assert manifest["stats"]["mask_conversions"] == {
        "0/1 scaled to 0/255": 1,
        "16-bit": 2,
        "alpha": 1,
        "grey RGB": 2,
        "grey palette": 1,
        "mode 1": 1,
    }


def test_source_bytes_are_kept_when_no_change_is_needed(tmp_path):
    rgb, mask = scene(30, 50, seed=3)
    add(tmp_path, "plain.jpg", Image.fromarray(rgb), Image.fromarray(mask))
    add(tmp_path, "lossless.png", Image.fromarray(rgb), Image.fromarray(mask))
    manifest = pack_folder(tmp_path)
    samples = {s["__key__"]: s for s in read_samples(tmp_path / "out")}
    assert samples["plain"]["jpg"] == (tmp_path / "src" / "img" / "plain.jpg").read_bytes()
    assert samples["plain"]["mask.png"] == (tmp_path / "src" / "gt" / "plain.png").read_bytes()
    assert samples["lossless"]["png"] == (tmp_path / "src" / "img" / "lossless.png").read_bytes()
    assert manifest["stats"]["images_kept_original"] == 2


def test_exif_orientation_is_applied_to_the_image(tmp_path):
    rgb, _ = scene(40, 60, seed=4)  # stored 60 wide, 40 tall
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # displayed rotated 90 degrees clockwise: 40 wide, 60 tall
    path = tmp_path / "src" / "img" / "rotated.jpg"
    save(Image.fromarray(rgb), path, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(path))
    assert upright.size == (40, 60)
    _, upright_mask = scene(60, 40, seed=5)
    save(Image.fromarray(upright_mask), tmp_path / "src" / "gt" / "rotated.png")
    manifest = pack_folder(tmp_path)
    image, mask, meta = by_source(tmp_path / "out")["rotated.jpg"]
    assert meta["orig_size"] == meta["stored_size"] == [60, 40] and image.shape == (60, 40, 3)
    assert np.abs(image.astype(int) - np.asarray(upright, dtype=int)).mean() < 3  # re-encoded at quality 95
    assert (mask == upright_mask).all()
    assert manifest["stats"]["image_conversions"] == {"exif-rotated": 1}


def test_max_side_downscales_image_and_mask(tmp_path):
    write_pair(tmp_path / "src" / "img" / "big.jpg", tmp_path / "src" / "gt" / "big.png", h=100, w=200)
    pack_folder(tmp_path, max_side=64)
    image, mask, meta = by_source(tmp_path / "out")["big.jpg"]
    assert meta["orig_size"] == [100, 200] and meta["stored_size"] == [32, 64]
    assert image.shape == (32, 64, 3) and mask.shape == (32, 64)


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("corrupt", "img/bad.jpg: not an image file Pillow can read"),
        ("truncated_jpeg", "img/bad.jpg: corrupt or truncated JPEG: truncated"),
        ("truncated_mask", "gt/bad.png: corrupt or truncated image data"),
        (
            "size_mismatch",
            "gt/bad.png: mask is 64x40 (WxH) but its image img/bad.jpg is 64x48 (after EXIF orientation); they "
            "must match: pass --on-mismatch resize",
        ),
        ("float_mask", "gt/bad.tif: unsupported mask mode F; valid modes: 1, I, I;16"),
    ],
)
def test_bad_files_stop_the_pack_with_path_and_reason_unless_skipped(tmp_path, problem, expected):
    write_pair(tmp_path / "src" / "img" / "good.jpg", tmp_path / "src" / "gt" / "good.png")
    bad_image, bad_mask = tmp_path / "src" / "img" / "bad.jpg", tmp_path / "src" / "gt" / "bad.png"
    write_pair(bad_image, bad_mask, seed=1)
    if problem == "corrupt":
        bad_image.write_bytes(np.random.default_rng(0).bytes(3000))
    elif problem == "truncated_jpeg":
        _truncated(bad_image)
    elif problem == "truncated_mask":
        _truncated(bad_mask)
    elif problem == "size_mismatch":
        save(Image.new("L", (64, 40)), bad_mask)
    else:
        bad_mask.unlink()
        save(Image.new("F", (64, 48)), tmp_path / "src" / "gt" / "bad.tif")
    with pytest.raises(ShardsError, match="--skip-bad") as err:
        pack_folder(tmp_path)
    assert expected in str(err.value)
    assert not list((tmp_path / "out").iterdir())  # the failed pack removed its partial shard

    manifest = pack_folder(tmp_path, skip_bad=True, overwrite=True)
    assert manifest["total_samples"] == 1
    assert len(manifest["skipped"]) == 1 and expected.startswith(manifest["skipped"][0]["path"] + ":")
    assert [s["__key__"] for s in read_samples(tmp_path / "out")] == ["good"]


def _damaged(data: bytes, rng: np.random.Generator) -> bytes:
    """One random kind of damage: a byte in the headers, a bit flip, 32 random or zero bytes in
    the scan data, or truncation."""
    b = bytearray(data)
    scan = b.find(b"\xff\xda") + 14
    kind, pos = rng.integers(5), int(rng.integers(scan, len(b) - 40))
    if kind == 0:
        b[int(rng.integers(2, scan))] = int(rng.integers(256))
    elif kind == 1:
        b[pos] ^= 1 << int(rng.integers(8))
    elif kind == 2:
        b[pos : pos + 32] = rng.bytes(32)
    elif kind == 3:
        b[pos : pos + 32] = bytes(32)
    else:
        del b[pos:]
    return bytes(b)


def test_jpeg_check_without_decoding_rejects_every_file_a_full_decode_rejects():
    """Kept JPEGs are checked by a marker walk plus libjpeg's header parse (salnet/shards/jpeg.py)."""
    from salnet.shards.jpeg import JpegStructureError, check_jpeg

    rng = np.random.default_rng(0)
    originals = []
    for seed, options in enumerate(
        [{}, {"progressive": True}, {"restart_marker_blocks": 2}, {"subsampling": 0, "quality": 70}]
    ):
        rgb, _ = scene(64, 80, seed)
        noisy = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)  # dense scan data
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, "JPEG", **options)
        originals.append(buffer.getvalue())
    for data in originals:
        check_jpeg(data)  # no false alarm on sound files of each kind

    decode_rejects = check_rejects = 0
    for i in range(600):
        data = _damaged(originals[i % len(originals)], rng)
        try:
            Image.open(io.BytesIO(data)).load()
            decodes = True
        except Exception:  # noqa: BLE001 - any failure of the full decode counts as a rejection
            decodes = False
        try:
            Image.open(io.BytesIO(data))  # pack opens every image (mode, size, EXIF) before the check
            check_jpeg(data)
            passes = True
        except (JpegStructureError, OSError, SyntaxError, ValueError):
            passes = False
        assert decodes or not passes, f"damaged file {i} fails a full decode but passes the check"
        decode_rejects += not decodes
        check_rejects += not passes
    assert decode_rejects > 100 and check_rejects >= decode_rejects  # the damage was real, and the check saw it all
