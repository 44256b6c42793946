"""Pack output: plain WebDataset shards, byte-identical repacks, splitting, atomicity, the manifest."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from salnet.shards.manifest import ManifestError, ShardsError, load_manifest
from salnet.shards.pack import pack

from conftest import REPO, run_py
from shards_data import decoded, make_folder_dataset, read_samples, save, scene


def dataset(root, count=12, h=48, w=64):
    """An ECSSD-style folder: JPEG images (two of them converted on packing) and PNG masks."""
    make_folder_dataset(root / "images", root / "ground_truth_mask", [f"s{i:03d}" for i in range(count)], h=h, w=w)
    save(Image.fromarray(scene(h, w, 99)[0]).convert("L"), root / "images" / "s000.jpg")  # grayscale JPEG: re-encoded
    return root


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_repack_is_byte_identical_whatever_the_workers(tmp_path):
    src = dataset(tmp_path / "src")
    first = pack(src, tmp_path / "a" / "ds", workers=1, shard_samples=5)
    run_py(["-m", "salnet.shards", "pack", src, tmp_path / "b" / "ds", "--workers", "2", "--shard-samples", "5"])
    assert shard_bytes(tmp_path / "a" / "ds") == shard_bytes(tmp_path / "b" / "ds")
    assert len(shard_bytes(tmp_path / "a" / "ds")) == 3
    second = load_manifest(tmp_path / "b" / "ds")
    assert first["shards"] == second["shards"] and first["stats"] == second["stats"]
    assert second["command"].startswith("python -m salnet.shards pack ")


def test_shuffle_seed_fixes_the_order(tmp_path):
    src = dataset(tmp_path / "src")
    orders = {}
    for seed in (0, 1, None):
        pack(src, tmp_path / f"out{seed}", workers=1, shuffle_seed=seed)
        orders[seed] = [s["__key__"] for s in read_samples(tmp_path / f"out{seed}")]
    assert orders[None] == sorted(orders[None])
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == orders[None]


def test_shards_are_plain_tar_and_webdataset_with_consecutive_members(tmp_path):
    out = tmp_path / "out"
    manifest = pack(dataset(tmp_path / "src"), out, workers=1, shard_samples=5)
    names = []
    for shard in manifest["shards"]:
        listing = subprocess.run(
            ["tar", "-tf", out / shard["file"]], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(listing) == 3 * shard["samples"]
        names += listing
    for i in range(0, len(names), 3):
        key = names[i].split(".")[0]
        assert names[i] in (f"{key}.jpg", f"{key}.png") and names[i + 1 : i + 3] == [f"{key}.mask.png", f"{key}.json"]
    with tarfile.open(out / manifest["shards"][0]["file"]) as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar} == {(0, 0, 0, "", "", 0o644)}

    samples = read_samples(out)
    assert sorted(s["__key__"] for s in samples) == [f"s{i:03d}" for i in range(12)]
    for s in samples:
        image, mask, meta = decoded(s)
        assert (
            image.shape == (48, 64, 3)
            and mask.shape == (48, 64)
            and meta["stored_size"] == meta["orig_size"] == [48, 64]
        )
        assert meta["key"] == s["__key__"] and meta["source"] == f"images/{s['__key__']}.jpg"


def test_shard_bytes_limit_holds_and_the_manifest_matches_the_files(tmp_path):
    out = tmp_path / "out"
    limit = 40 * 1024
    manifest = pack(
        dataset(tmp_path / "src", count=20, h=96, w=128), out, workers=1, shard_samples=None, shard_bytes=limit
    )
    assert len(manifest["shards"]) > 2
    for shard in manifest["shards"]:
        assert (out / shard["file"]).stat().st_size == shard["bytes"] <= limit
    assert manifest["total_bytes"] == sum(s["bytes"] for s in manifest["shards"])
    assert manifest["total_samples"] == 20 == sum(s["samples"] for s in manifest["shards"])
    assert [s["file"] for s in manifest["shards"]] == [f"out-{i:06d}.tar" for i in range(len(manifest["shards"]))]
    # a sample larger than the limit gets a shard of its own rather than failing
    tiny = pack(tmp_path / "src", tmp_path / "tiny", workers=1, shard_samples=None, shard_bytes=1024)
    assert [s["samples"] for s in tiny["shards"]] == [1] * 20


def test_non_empty_out_is_refused_unless_overwrite_which_removes_only_pack_files(tmp_path):
    src = dataset(tmp_path / "src")
    out = tmp_path / "out"
    pack(src, out, workers=1, shard_samples=4)  # 3 shards
    with pytest.raises(Exception, match="is not empty: it holds a complete dataset; pass --overwrite"):
        pack(src, out, workers=1)
    manifest = pack(src, out, workers=1, overwrite=True)  # one shard now: the stale ones must go
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "out-000000.tar"]
    assert manifest["total_samples"] == 12
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match=r"--overwrite only removes a previous pack's files .* notes.txt"):
        pack(src, out, workers=1, overwrite=True)
    assert (out / "manifest.json").exists()  # refused before touching anything


def test_interrupted_pack_leaves_nothing_that_looks_complete(tmp_path):
    src = tmp_path / "src"
    for i in range(400):  # BMP sources are converted, so each sample costs a few milliseconds
        rgb, mask = scene(96, 96, i)
        save(Image.fromarray(rgb), src / "images" / f"s{i:03d}.bmp")
        save(Image.fromarray(mask), src / "ground_truth_mask" / f"s{i:03d}.png")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "salnet.shards", "pack", str(src), str(out), "--workers", "2", "--shard-samples", "20"],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("*.partial"))) < 2:
        time.sleep(0.005)
    assert proc.poll() is None, f"the pack ended before it could be interrupted: {proc.stderr.read().decode()}"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: main process and its workers
    proc.wait(timeout=30)
    proc.stderr.close()

    left = sorted(p.name for p in out.iterdir())
    assert left and all(name.endswith(".tar.partial") for name in left), left
    with pytest.raises(ManifestError, match="is not a complete shard directory"):
        load_manifest(out)
    refused = run_py(["-m", "salnet.shards", "pack", src, out], check=False)
    assert refused.returncode == 2 and "no manifest.json (an interrupted pack?)" in refused.stderr
    run_py(["-m", "salnet.shards", "pack", src, out, "--overwrite", "--workers", "1", "--shard-samples", "20"])
    assert load_manifest(out)["total_samples"] == 400 and not list(out.glob("*.partial"))


def test_load_manifest_names_the_problem(tmp_path):
    pack(dataset(tmp_path / "src"), tmp_path / "ds", workers=1, shard_samples=5)
    with pytest.raises(ManifestError, match="'.*nowhere' does not exist"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="empty' is not a complete shard directory: it has no manifest.json"):
        load_manifest(tmp_path / "empty")
    manifest_path = tmp_path / "ds" / "manifest.json"
    good = json.loads(manifest_path.read_text())
    cases = [
        ("{not json", "is not valid JSON"),
        (json.dumps({**good, "format": "other"}), "\"format\" is 'other', expected 'salnet-shards'"),
        (json.dumps({k: v for k, v in good.items() if k != "stats"}), 'lacks the field "stats"'),
        (json.dumps({**good, "total_samples": 13}), "total_samples is 13 but the shards hold 12"),
        (json.dumps({**good, "shards": [{**good["shards"][0], "file": "../x.tar"}]}), "must be a plain .tar file name"),
    ]
    for text, expected in cases:
        manifest_path.write_text(text)
        with pytest.raises(ManifestError, match=expected):
            load_manifest(tmp_path / "ds")
    manifest_path.write_text(json.dumps(good))
    shard = tmp_path / "ds" / good["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(ManifestError, match=f"shard '.*{shard.name}' has {good['shards'][1]['bytes'] - 512} bytes"):
        load_manifest(tmp_path / "ds")
    shard.unlink()
    with pytest.raises(ManifestError, match=f"lists shard '{shard.name}', which is missing"):
        load_manifest(tmp_path / "ds")


def duts_te(root, mismatched_image=(308, 400), mask=(266, 400)):
    """A DUTS-TE-like folder: two sound pairs and one whose image (H, W) differs from its mask's, as in the official set."""
    src = root / "DUTS-TE"
    for i in range(3):
        size = mismatched_image if i == 2 else mask
        rgb, _ = scene(*size, seed=i)
        save(Image.fromarray(rgb), src / "DUTS-TE-Image" / f"ILSVRC2012_test_{i:08d}.jpg")
        save(Image.fromarray(scene(*mask, seed=10 + i)[1]), src / "DUTS-TE-Mask" / f"ILSVRC2012_test_{i:08d}.png")
    return src


MISMATCH = (
    "DUTS-TE-Mask/ILSVRC2012_test_00000002.png: mask is 400x266 (WxH) but its image "
    "DUTS-TE-Image/ILSVRC2012_test_00000002.jpg is 400x308 (after EXIF orientation); they must match: "
    "pass --on-mismatch resize to resize the image to its mask (the mask is the ground truth)"
)


def test_on_mismatch_fail_names_the_pair_and_suggests_resize(tmp_path):
    src = duts_te(tmp_path)
    with pytest.raises(ShardsError) as err:
        pack(src, tmp_path / "out", workers=1)
    assert MISMATCH in str(err.value)
    refused = run_py(["-m", "salnet.shards", "pack", src, tmp_path / "cli", "--workers", "1"], check=False)
    assert refused.returncode == 2 and MISMATCH in refused.stderr and "--on-mismatch skip" in refused.stderr


def test_on_mismatch_resize_stores_the_image_at_its_masks_size_and_lists_it(tmp_path):
    src = duts_te(tmp_path)
    result = run_py(["-m", "salnet.shards", "pack", src, tmp_path / "out", "--workers", "1", "--on-mismatch", "resize"])
    manifest = load_manifest(tmp_path / "out")
    assert manifest["layout"] == "duts" and manifest["total_samples"] == 3 and manifest["skipped"] == []
    assert manifest["resized"] == [
        {
            "image": "DUTS-TE-Image/ILSVRC2012_test_00000002.jpg",
            "mask": "DUTS-TE-Mask/ILSVRC2012_test_00000002.png",
            "from": [308, 400],
            "to": [266, 400],
        }
    ]
    assert manifest["stats"]["image_conversions"] == {"resized to its mask": 1}
    assert manifest["options"]["on_mismatch"] == "resize"
    assert "pack: resized 1 images to their masks' size (--on-mismatch resize" in result.stderr
    assert "DUTS-TE-Image/ILSVRC2012_test_00000002.jpg: 400x308 -> 400x266 (WxH)" in result.stderr
    samples = {s["__key__"]: s for s in read_samples(tmp_path / "out")}
    image, mask, meta = decoded(samples["ILSVRC2012_test_00000002"])
    assert image.shape == (266, 400, 3) and mask.shape == (266, 400)
    assert meta["orig_size"] == meta["stored_size"] == [266, 400]
    expected = Image.open(src / "DUTS-TE-Image" / "ILSVRC2012_test_00000002.jpg").resize(
        (400, 266), Image.Resampling.LANCZOS
    )
    assert abs(image.astype(int) - np.asarray(expected, dtype=int)).mean() < 2  # re-encoded as JPEG at quality 95
    assert (
        samples["ILSVRC2012_test_00000002"]["mask.png"]
        == (src / "DUTS-TE-Mask" / "ILSVRC2012_test_00000002.png").read_bytes()
    )
    for key in ("ILSVRC2012_test_00000000", "ILSVRC2012_test_00000001"):  # sound pairs are untouched, bytes and all
        assert samples[key]["jpg"] == (src / "DUTS-TE-Image" / f"{key}.jpg").read_bytes()
    assert (
        "resized      1 images to their masks' size" in run_py(["-m", "salnet.shards", "info", tmp_path / "out"]).stdout
    )
    # with --max-side the resized image is then downscaled like any other
    small = pack(src, tmp_path / "small", workers=1, on_mismatch="resize", max_side=200)
    assert small["resized"][0]["to"] == [266, 400] and small["stats"]["stored_height"]["max"] == 133


def test_on_mismatch_skip_leaves_the_pair_out_and_lists_it(tmp_path):
    lines = []
    manifest = pack(duts_te(tmp_path), tmp_path / "out", workers=1, on_mismatch="skip", log=lines.append)
    assert manifest["total_samples"] == 2 and manifest["resized"] == []
    assert len(
        manifest["skipped"]
    ) == 1 and f"{manifest['skipped'][0]['path']}: {manifest['skipped'][0]['reason']}".startswith(MISMATCH)
    assert any(
        line.startswith("pack: skipped 1 files") and "ILSVRC2012_test_00000002.png: mask is 400x266" in line
        for line in lines
    )
    assert sorted(s["__key__"] for s in read_samples(tmp_path / "out")) == [
        "ILSVRC2012_test_00000000",
        "ILSVRC2012_test_00000001",
    ]
    with pytest.raises(ShardsError, match="--on-mismatch must be one of fail, resize, skip, got 'crop'"):
        pack(tmp_path / "DUTS-TE", tmp_path / "other", workers=1, on_mismatch="crop")
