"""salnet.predict end to end: real checkpoint, real image files and shards, real processes (CPU, 64 px)."""

import json

import numpy as np
import pytest
import torch
from evaluation_data import SIZES, ecssd_folder, tiny_checkpoint
from PIL import Image

from salnet.data.transforms import resize_for_eval
from salnet.evaluation import predict as salnet_predict
from salnet.evaluation.common import load_best_weights, make_predict
from salnet.metrics.inputs import to_levels
from salnet.validate import probabilities_at

from conftest import forked_run, ranks, run_py
from shards_data import EXIF_ORIENTATION, save, scene


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("run"))


def predict(checkpoint, inputs, out, *extra, check=True):
    return forked_run(
        ["-m", "salnet.predict", "--checkpoint", checkpoint, *inputs, "--out", out, "--workers", "0", *extra],
        timeout=180,
        check=check,
    )


def map_of(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L", (path, im.format, im.mode)
        return np.asarray(im)


def test_maps_have_the_original_size_for_odd_sizes_formats_and_exif_rotated_sources(tmp_path, checkpoint):
    folder = tmp_path / "photos"
    expected = {}  # stem -> (H, W) of the upright image
    for i, ((h, w), ext) in enumerate(
        zip(SIZES, [".jpg", ".png", ".bmp", ".jpeg", ".tif", ".JPG", ".PNG"], strict=True)
    ):
        rgb, _ = scene(h, w, seed=i)
        save(Image.fromarray(rgb), folder / f"odd{i}{ext}")
        expected[f"odd{i}"] = (h, w)
    rgb, _ = scene(30, 70, seed=9)  # stored 70 wide, 30 high; orientation 6 shows it rotated: 70 high, 30 wide
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    save(Image.fromarray(rgb), folder / "rotated.jpg", exif=exif.tobytes())
    expected["rotated"] = (70, 30)
    save(Image.fromarray(scene(37, 53, seed=10)[0]).convert("L"), folder / "gray.png")
    expected["gray"] = (37, 53)

    out = tmp_path / "maps"
    predict(checkpoint, [str(folder)], out)
    written = {p.stem: map_of(p) for p in (out / "photos").iterdir()}
    assert {stem: m.shape for stem, m in written.items()} == expected
    assert all(m.std() > 0 for m in written.values()), "a map is constant: the network saw no image"

    # The map of a plain RGB JPEG is floor(255 p) of the network's probabilities at the image's size.
    ckpt = load_best_weights(checkpoint)
    net = make_predict(ckpt, "fp32")
    with Image.open(folder / "odd0.jpg") as im:
        image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    torch.set_num_threads(1)  # as the subprocess ran (OMP_NUM_THREADS=1): same kernels, same floats
    prob = probabilities_at(net(resize_for_eval(image, 64)[None]), [expected["odd0"]])[0]
    levels = to_levels(prob).numpy()
    assert (
        np.abs(levels - written["odd0"].astype(int)).max() <= 1
    )  # torchvision's and Pillow's JPEG decoders may differ by a level
    assert (levels == written["odd0"]).mean() > 0.99


def test_a_dataset_folder_and_its_packed_shards_give_identical_maps(tmp_path, checkpoint):
    stems = ecssd_folder(tmp_path / "ECSSD", 5)
    run_py(["-m", "salnet.shards", "pack", tmp_path / "ECSSD", tmp_path / "shards" / "ecssd"])
    out = tmp_path / "maps"
    predict(checkpoint, [str(tmp_path / "ECSSD"), f"ECSSD-shards={tmp_path / 'shards' / 'ecssd'}"], out)
    for stem, (h, w) in zip(stems, SIZES, strict=False):
        from_folder = (out / "ECSSD" / f"{stem}.png").read_bytes()
        assert (out / "ECSSD-shards" / f"{stem}.png").read_bytes() == from_folder, stem
        assert map_of(out / "ECSSD" / f"{stem}.png").shape == (h, w)
    report = json.loads((out / "predict.json").read_text())
    assert {name: (d["kind"], d["written"]) for name, d in report["datasets"].items()} == {
        "ECSSD": ("dataset", 5),
        "ECSSD-shards": ("shards", 5),
    }


@pytest.mark.slow
def test_two_ranks_predict_every_image_exactly_once(tmp_path, checkpoint):
    ecssd_folder(tmp_path / "ECSSD", 4)
    run_py(["-m", "salnet.shards", "pack", tmp_path / "ECSSD", tmp_path / "shards" / "ecssd"])
    (tmp_path / "list.txt").write_text(
        "# image [mask]\nECSSD/images/img_000.jpg ECSSD/ground_truth_mask/img_000.png\n'ECSSD/images/img_003.jpg'\n"
    )
    inputs = [str(tmp_path / "ECSSD" / "images"), f"packed={tmp_path / 'shards' / 'ecssd'}", str(tmp_path / "list.txt")]
    one, two = tmp_path / "one", tmp_path / "two"
    predict(checkpoint, inputs, one, "--batch-size", "1")
    ranks(
        2,
        [
            "-m",
            "salnet.predict",
            "--checkpoint",
            checkpoint,
            *inputs,
            "--out",
            two,
            "--workers",
            "1",
            "--batch-size",
            "1",
        ],
    )
    report = json.loads((two / "predict.json").read_text())
    assert report["world_size"] == 2 and sum(report["per_rank"]) == 10 and min(report["per_rank"]) > 0
    assert {name: d["written"] for name, d in report["datasets"].items()} == {"images": 4, "packed": 4, "list": 2}
    maps_one = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert maps_one == sorted(p.relative_to(two) for p in two.rglob("*.png")) and len(maps_one) == 10
    for rel in maps_one:  # same network, same per-image computation: the same bytes, whichever rank wrote them
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel


def test_an_unreadable_image_is_named_and_skip_bad_lists_it(tmp_path, checkpoint, capsys):
    folder = tmp_path / "mixed"
    for i in range(3):
        save(Image.fromarray(scene(40 + i, 50, seed=i)[0]), folder / f"good{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    good = (folder / "good0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with open(folder / "sparse.jpg", "wb") as f:  # a good JPEG and 300 MiB of (sparse) zeros: refused unread
        f.write(good)
        f.truncate(300 * 2**20)
    args = ["--checkpoint", str(checkpoint), str(folder), "--workers", "0"]

    with pytest.raises(SystemExit) as exit_:
        salnet_predict.main(args + ["--out", str(tmp_path / "stop")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "broken.jpg" in err and "--skip-bad" in err and "Traceback" not in err

    out = tmp_path / "skip"
    salnet_predict.main(args + ["--out", str(out), "--skip-bad"])
    assert sorted(p.name for p in (out / "mixed").iterdir()) == ["good0.png", "good1.png", "good2.png"]
    skipped = json.loads((out / "predict.json").read_text())["datasets"]["mixed"]["skipped"]
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in skipped) == ["broken.jpg", "sparse.jpg", "truncated.jpg"]
    assert all(s["reason"] for s in skipped)
    assert [s["reason"] for s in skipped if s["path"].endswith("sparse.jpg")] == [
        f"the file is {300 * 2**20} bytes, above the limit of {256 * 2**20} bytes for one image; not read "
        "(--max-member-bytes)"
    ]
    stdout = capsys.readouterr().out
    assert "3 skipped" in stdout and "broken.jpg" in stdout


def test_test_time_augmentation_averages_scales_and_mirrors(tmp_path, checkpoint):
    stems = ecssd_folder(tmp_path / "ECSSD", 2)
    plain, tta = tmp_path / "plain", tmp_path / "tta"
    args = ["--checkpoint", str(checkpoint), str(tmp_path / "ECSSD"), "--workers", "0"]
    salnet_predict.main(args + ["--out", str(plain)])
    salnet_predict.main(args + ["--out", str(tta), "--tta-flip", "--tta-scales", "0.5,1", "--batch-size", "2"])
    report = json.loads((tta / "predict.json").read_text())
    assert report["input_sizes"] == [32, 64] and report["tta_flip"] is True
    for stem, (h, w) in zip(stems, SIZES, strict=False):
        a, b = map_of(plain / "ECSSD" / f"{stem}.png"), map_of(tta / "ECSSD" / f"{stem}.png")
        assert a.shape == b.shape == (h, w) and not np.array_equal(a, b)


def test_a_sample_claiming_a_huge_original_size_is_refused_before_its_map_is_made(tmp_path, checkpoint, capsys):
    """Issue 22, item 8: a 64x64 sample whose KEY.json claims orig_size [20000, 20000] (400 MP: a 5.4 GB
    peak before) is held to the pixel limit, before the map is allocated."""
    import io
    import tarfile

    from shards_data import encode, replace_shard, write_raw_shards

    samples = []
    for key, seed in (("big", 1), ("fine", 2)):
        rgb, mask = scene(64, 64, seed=seed)
        samples.append((key, "png", encode(Image.fromarray(rgb)), encode(Image.fromarray(mask))))
    shards = tmp_path / "shards"
    file = write_raw_shards(shards, samples)["shards"][0]["file"]
    out = io.BytesIO()
    with tarfile.open(shards / file) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            if info.name == "big.json":
                data = json.dumps({**json.loads(data), "orig_size": [20000, 20000]}).encode()
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    replace_shard(shards, file, out.getvalue())
    args = ["--checkpoint", str(checkpoint), f"S={shards}", "--workers", "0"]

    with pytest.raises(SystemExit) as exit_:
        salnet_predict.main(args + ["--out", str(tmp_path / "stop")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert "big" in err and "orig_size [20000, 20000]: 20000x20000 pixels (400.0 MP) is above the limit" in err, err

    salnet_predict.main(args + ["--out", str(tmp_path / "skip"), "--skip-bad"])
    assert sorted(p.name for p in (tmp_path / "skip" / "S").iterdir()) == ["fine.png"]
    skipped = json.loads((tmp_path / "skip" / "predict.json").read_text())["datasets"]["S"]["skipped"]
    assert len(skipped) == 1 and "big" in skipped[0]["path"] and "400.0 MP" in skipped[0]["reason"]


def test_an_out_that_is_a_file_or_cannot_be_a_folder_is_one_line_naming_it(tmp_path, checkpoint, capsys):
    """Issue 22, item 14: checked before the checkpoint is loaded or an image read."""
    ecssd_folder(tmp_path / "ECSSD", 1)
    a_file = tmp_path / "maps.png"
    a_file.write_bytes(b"")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ECSSD").write_bytes(b"")  # where the dataset's folder would go
    for out, words in (
        (a_file, f"--out '{a_file}' is a file, not a folder"),
        (a_file / "maps", f"--out '{a_file / 'maps'}' is not a writable folder: Not a directory"),
        (tmp_path / "out", f"--out '{tmp_path / 'out' / 'ECSSD'}' is a file, not a folder"),
    ):
        with pytest.raises(SystemExit) as exit_:
            salnet_predict.main(["--checkpoint", str(checkpoint), str(tmp_path / "ECSSD"), "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.strip().splitlines() == [f"python -m salnet.predict: error: {words}"]
