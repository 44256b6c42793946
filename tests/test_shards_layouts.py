"""Layouts: each standard dataset's folders, any pair of folders, list files; pairing problems."""

import json

import pytest

from salnet.shards.layouts import find_pairs, make_key
from salnet.shards.manifest import ShardsError, load_manifest
from salnet.shards.pack import pack

from shards_data import make_folder_dataset, read_samples, write_pair

STEMS = ["b_002", "a_001", "c-003"]

# layout -> (images folder, masks folder) inside the archive's top folder, as distributed
STANDARD = {
    "duts": ("DUTS-TR/DUTS-TR-Image", "DUTS-TR/DUTS-TR-Mask"),
    "ecssd": ("ECSSD/images", "ECSSD/ground_truth_mask"),
    "hkuis": ("HKU-IS/imgs", "HKU-IS/gt"),
    "pascals": ("PASCAL-S/datasets/imgs/pascal", "PASCAL-S/datasets/masks/pascal"),
    "dutomron": ("DUT-OMRON-image", "pixelwiseGT-new-PNG"),
}


@pytest.mark.parametrize("layout", sorted(STANDARD))
def test_standard_layout_is_detected_and_packed(tmp_path, layout, capsys):
    images, masks = STANDARD[layout]
    make_folder_dataset(tmp_path / "src" / images, tmp_path / "src" / masks, STEMS)
    manifest = pack(tmp_path / "src", tmp_path / "out", workers=1)
    assert f"layout '{layout}'" in capsys.readouterr().err  # auto says what it chose
    assert manifest["layout"] == layout and manifest["total_samples"] == 3
    assert load_manifest(tmp_path / "out") == manifest
    samples = read_samples(tmp_path / "out")
    assert sorted(s["__key__"] for s in samples) == sorted(STEMS)
    meta = json.loads(samples[0]["json"])
    assert meta["source"].startswith(images.split("/")[0]) and meta["dataset"] == "out"
    # the explicit layout finds the same pairs
    assert [p.key for p in find_pairs(tmp_path / "src", layout).pairs] == sorted(STEMS)


def test_auto_refuses_to_guess_between_two_datasets(tmp_path):
    make_folder_dataset(
        tmp_path / "DUTS" / "DUTS-TR" / "DUTS-TR-Image", tmp_path / "DUTS" / "DUTS-TR" / "DUTS-TR-Mask", ["a"]
    )
    make_folder_dataset(
        tmp_path / "DUTS" / "DUTS-TE" / "DUTS-TE-Image", tmp_path / "DUTS" / "DUTS-TE" / "DUTS-TE-Mask", ["b"]
    )
    with pytest.raises(ShardsError, match="refusing to guess") as err:
        find_pairs(tmp_path / "DUTS")
    assert "DUTS-TR/DUTS-TR-Image" in str(err.value) and "DUTS-TE/DUTS-TE-Image" in str(err.value)
    assert [p.key for p in find_pairs(tmp_path / "DUTS" / "DUTS-TE").pairs] == ["b"]


def test_unknown_folder_names_the_layouts_it_looked_for(tmp_path):
    make_folder_dataset(tmp_path / "x" / "pics", tmp_path / "x" / "labels", ["a"])
    with pytest.raises(ShardsError, match="DUTS-TR-Image/ .*--images DIR --masks DIR"):
        find_pairs(tmp_path / "x")


def test_folders_layout_with_case_insensitive_extensions_and_ignored_files(tmp_path):
    write_pair(tmp_path / "pics" / "one.JPG", tmp_path / "labels" / "one.PNG")
    write_pair(tmp_path / "pics" / "two.jpeg", tmp_path / "labels" / "two.png")
    write_pair(tmp_path / "pics" / "three.bmp", tmp_path / "labels" / "three.bmp")
    (tmp_path / "pics" / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "pics" / ".DS_Store").write_bytes(b"x")
    found = find_pairs(tmp_path, images="pics", masks="labels")
    assert found.layout == "folders" and [p.key for p in found.pairs] == ["one", "three", "two"]
    assert found.ignored == ["pics/Thumbs.db"] and not found.unpaired
    manifest = pack(tmp_path, tmp_path / "out", images="pics", masks="labels", workers=1)
    assert manifest["stats"]["image_conversions"] == {"format BMP": 1}  # BMP re-encoded (as PNG), JPEGs kept


def test_list_layout_with_quoted_paths_comments_and_repeated_stems(tmp_path):
    write_pair(tmp_path / "a" / "img 1.jpg", tmp_path / "a" / "m1.png", seed=1)
    write_pair(tmp_path / "b" / "img 1.jpg", tmp_path / "b" / "m1.png", seed=2)
    listing = tmp_path / "pairs.txt"
    listing.write_text("# image mask\n'a/img 1.jpg' a/m1.png\n\n\"b/img 1.jpg\" b/m1.png  # same stem, other folder\n")
    manifest = pack(listing, tmp_path / "out", workers=1)
    assert manifest["layout"] == "list" and manifest["total_samples"] == 2
    keys = sorted(s["__key__"] for s in read_samples(tmp_path / "out"))
    assert len(set(keys)) == 2 and all(k.startswith("img_1-") and "." not in k for k in keys)


def test_list_layout_errors_name_the_line(tmp_path):
    listing = tmp_path / "pairs.txt"
    listing.write_text("a.jpg a.png\nb.jpg\n")
    with pytest.raises(ShardsError, match=r"pairs.txt:2: expected 'image_path mask_path', got 1 fields"):
        find_pairs(listing)


def test_unpaired_files_stop_the_pack_with_a_list_unless_skipped(tmp_path):
    make_folder_dataset(
        tmp_path / "src" / "images", tmp_path / "src" / "ground_truth_mask", [f"p{i:02d}" for i in range(3)]
    )
    for i in range(25):
        write_pair(tmp_path / "src" / "images" / f"lonely{i:02d}.jpg", tmp_path / "elsewhere" / f"{i}.png")
    write_pair(tmp_path / "elsewhere" / "x.jpg", tmp_path / "src" / "ground_truth_mask" / "orphan.png")
    with pytest.raises(ShardsError) as err:
        pack(tmp_path / "src", tmp_path / "out", workers=1)
    message = str(err.value)
    assert "26 files" in message and "images/lonely00.jpg: no mask with the stem 'lonely00'" in message
    assert "... and 6 more (26 in all)" in message and "--skip-unpaired" in message
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known to be good

    manifest = pack(tmp_path / "src", tmp_path / "out", workers=1, skip_unpaired=True)
    assert manifest["total_samples"] == 3 and len(manifest["skipped"]) == 26
    assert {"path": "ground_truth_mask/orphan.png", "reason": "no image with the stem 'orphan' in images/"} in manifest[
        "skipped"
    ]


def test_duplicate_stems_are_ambiguous_not_guessed(tmp_path):
    make_folder_dataset(tmp_path / "images", tmp_path / "ground_truth_mask", ["dup", "ok"])
    write_pair(tmp_path / "images" / "dup.png", tmp_path / "spare" / "dup.png")
    with pytest.raises(ShardsError, match=r"ambiguous: 2 images share the stem 'dup' \(dup.jpg, dup.png\)"):
        pack(tmp_path, tmp_path / "out", workers=1)
    manifest = pack(tmp_path, tmp_path / "out", workers=1, skip_unpaired=True)
    assert manifest["total_samples"] == 1
    assert sorted(s["path"] for s in manifest["skipped"]) == [
        "ground_truth_mask/dup.png",
        "images/dup.jpg",
        "images/dup.png",
    ]
    assert {
        "path": "ground_truth_mask/dup.png",
        "reason": "its image is ambiguous: 2 images share the stem 'dup'",
    } in manifest["skipped"]


def test_dotted_and_unicode_names_become_safe_unique_keys(tmp_path):
    stems = ["photo.2021.01", "photo_2021_01", "naïve café", "日本語", "a b"]
    make_folder_dataset(tmp_path / "images", tmp_path / "ground_truth_mask", stems)
    pack(tmp_path, tmp_path / "out", workers=1)
    samples = read_samples(tmp_path / "out")
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == 5
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert "photo_2021_01" in keys and "日本語" in keys  # clean stems stay as they are
    sources = {json.loads(s["json"])["source"] for s in samples}
    assert sources == {f"images/{stem}.jpg" for stem in stems}
    assert make_key("photo.2021.01") != make_key("photo_2021.01") and make_key("x") == "x"
