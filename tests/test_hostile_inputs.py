"""Inputs that cannot exhaust the machine or be misread (issue #14, item 8), each tried for real:
decompression-bomb images, compressed shards and huge tar members, masks with no one reading,
manifests that lie or are malformed, and shard names that would reach a shell."""

import gzip
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
from evaluation_data import tiny_checkpoint
from PIL import Image

import salnet.data.transforms as transforms
from salnet.config import DataConfig
from salnet.data import DataError, TrainStream, ValStream
from salnet.data.reader import RawSample, read_shard
from salnet.data.sources import Limits, file_url, open_shard_set
from salnet.data.stream import loader_workers
from salnet.evaluation.common import EvaluationError
from salnet.evaluation.predict import Prepared, map_path
from salnet.shards.__main__ import main as shards_main
from salnet.shards.images import BadFileError, prepare_image
from salnet.shards.info import describe
from salnet.shards.manifest import ManifestError, load_manifest
from salnet.shards.pack import pack
from salnet.shards.parallel import available_cpus
from salnet.shards.synth import synthesize

from conftest import forked_run, run_py
from shards_data import (
    by_source,
    edit_manifest,
    encode,
    png_bomb,
    rename_members,
    replace_shard,
    scene,
    write_pair,
    write_png_rgb16,
    write_raw_shards,
)

# The loader decodes in salnet/data/transforms.py, which checks headers once it uses salnet.imagecheck.
loader_checks_headers = pytest.mark.skipif(
    not hasattr(transforms, "check_shard_member"), reason="salnet/data/transforms.py does not check image headers yet"
)

# The peak resident memory of this process's own address space: VmHWM. (getrusage's ru_maxrss would
# do in a shell, but Linux carries it over a fork and exec, so a child of pytest reports pytest's peak.)
PEAK_PROBE = """
import re, sys
from salnet.shards.__main__ import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    print("PEAK_KB", re.search(r"VmHWM:\\s*(\\d+) kB", f.read()).group(1), file=sys.stderr)
sys.exit(code)
"""
needs_proc = pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc/self/status (Linux)"
)


def shards_command_peak(args) -> tuple[int, str, str, int]:
    """Run `python -m salnet.shards ARGS` in a fresh process: (exit code, stdout, stderr, peak RSS in MB)."""
    result = run_py(["-c", PEAK_PROBE, *args], check=False)
    peak_kb = int(result.stderr.rsplit("PEAK_KB ", 1)[1])
    return result.returncode, result.stdout, result.stderr, peak_kb // 1024


@pytest.fixture(scope="module")
def bomb():
    return png_bomb(12000, 12000)  # 144 MP, 0.4 MB


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, train=12, val=2, size=32, shard_samples=4)
    return root / "train"


def copy_of(shard_dir, tmp_path):
    copy = tmp_path / "train"
    shutil.copytree(shard_dir, copy)
    return copy


def epoch_keys(location: str, batch_size: int = 1, epoch: int = 0) -> list[str]:
    cfg = DataConfig(train=[location], val=[location], size=16, batch_size=batch_size, workers=0, shuffle_buffer=1)
    return [k for b in TrainStream(cfg, seed=0, rank=0, world_size=1).epoch_batches(epoch) for k in b["key"]]


def verify(path, *flags):
    return run_py(["-m", "salnet.shards", "verify", path, "--workers", "1", *flags], check=False)


# --- images that decode to far more than they weigh --------------------------------------------


@needs_proc
def test_pack_refuses_a_144_megapixel_png_from_its_header_at_baseline_memory(tmp_path, bomb):
    normal, huge = tmp_path / "normal", tmp_path / "huge"
    write_pair(normal / "img" / "a.jpg", normal / "gt" / "a.png")
    (huge / "img").mkdir(parents=True)
    (huge / "img" / "a.png").write_bytes(bomb)
    shutil.copytree(normal / "gt", huge / "gt")
    flags = ["--images", "img", "--masks", "gt", "--workers", "1"]
    code, _, _, normal_mb = shards_command_peak(["pack", normal, tmp_path / "out1", *flags])
    assert code == 0
    code, _, err, refusing_mb = shards_command_peak(["pack", huge, tmp_path / "out2", *flags])
    print(f"\npeak RSS: pack of a normal pair {normal_mb} MB, pack refusing the 144 MP PNG {refusing_mb} MB")
    assert code == 2
    assert "img/a.png: 12000x12000 pixels (144.0 MP) is above the limit of 64.0 MP" in err and "--max-pixels" in err
    # Decoding it would take 0.4 GB for the pixels alone (0.6 GB peak before this check).
    assert refusing_mb < 1.25 * normal_mb, (normal_mb, refusing_mb)


def test_pack_checks_masks_too_and_max_pixels_moves_the_limit(tmp_path, bomb):
    write_pair(tmp_path / "src" / "img" / "a.jpg", tmp_path / "src" / "gt" / "a.png")  # 64 x 48 = 3072 pixels
    (tmp_path / "src" / "img" / "b.jpg").write_bytes((tmp_path / "src" / "img" / "a.jpg").read_bytes())
    (tmp_path / "src" / "gt" / "b.png").write_bytes(bomb)
    refused = run_py(
        [
            "-m",
            "salnet.shards",
            "pack",
            tmp_path / "src",
            tmp_path / "out",
            "--images",
            "img",
            "--masks",
            "gt",
            "--workers",
            "1",
        ],
        check=False,
    )
    assert refused.returncode == 2 and "gt/b.png: 12000x12000 pixels (144.0 MP)" in refused.stderr
    (tmp_path / "src" / "gt" / "b.png").unlink()
    (tmp_path / "src" / "img" / "b.jpg").unlink()
    low = run_py(
        [
            "-m",
            "salnet.shards",
            "pack",
            tmp_path / "src",
            tmp_path / "out",
            "--images",
            "img",
            "--masks",
            "gt",
            "--workers",
            "1",
            "--max-pixels",
            "3K",
            "--overwrite",
        ],
        check=False,
    )
    assert (
        low.returncode == 2
        and "img/a.jpg: 64x48 pixels (0.0 MP) is above the limit of 0.0 MP (3000 pixels)" in low.stderr
    )
    manifest = pack(
        tmp_path / "src", tmp_path / "out", images="img", masks="gt", workers=1, max_pixels=3072, overwrite=True
    )
    assert manifest["total_samples"] == 1 and manifest["options"]["max_pixels"] == 3072


@needs_proc
def test_verify_refuses_a_144_megapixel_png_in_a_shard_at_baseline_memory(tmp_path, bomb):
    rgb, mask = scene(48, 64, 0)
    normal = [("fine", "png", encode(Image.fromarray(rgb)), encode(Image.fromarray(mask)))]
    write_raw_shards(tmp_path / "normal", normal)
    write_raw_shards(tmp_path / "huge", normal + [("huge", "png", bomb, encode(Image.fromarray(mask)))])
    code, out, _, normal_mb = shards_command_peak(["verify", tmp_path / "normal", "--workers", "1"])
    assert code == 0, out
    code, out, _, refusing_mb = shards_command_peak(["verify", tmp_path / "huge", "--workers", "1"])
    print(f"\npeak RSS: verify of a normal shard {normal_mb} MB, verify refusing the 144 MP PNG {refusing_mb} MB")
    assert code == 1
    assert "raw-000000.tar: sample 'huge': png: 12000x12000 pixels (144.0 MP) is above the limit" in out
    assert refusing_mb < 1.25 * normal_mb, (normal_mb, refusing_mb)
    low = verify(tmp_path / "normal", "--max-pixels", "1000")
    assert low.returncode == 1 and "sample 'fine': png: 64x48 pixels" in low.stdout


def test_predicts_image_files_go_through_the_same_refusal(bomb):
    # salnet.predict prepares an image file exactly as pack stores it (prepare_image), so the check holds there too.
    with pytest.raises(BadFileError, match=r"^maps/in/huge\.png: 12000x12000 pixels \(144\.0 MP\)"):
        prepare_image(bomb, "maps/in/huge.png", max_side=None)


@loader_checks_headers
def test_the_loader_refuses_a_144_megapixel_png_naming_the_sample(tmp_path, bomb):
    _, mask = scene(48, 64, 0)
    raw = RawSample("s-000000.tar", 3, "huge", {"png": bomb, "mask.png": encode(Image.fromarray(mask))})
    with pytest.raises(
        transforms.SampleError, match=r"shard s-000000.tar, sample 'huge' \(#3\).*12000x12000 pixels \(144.0 MP\)"
    ):
        transforms.decode_sample(raw)


# --- shards that are not plain tar, members that are too big ------------------------------------


def test_a_gzip_compressed_shard_is_refused_before_anything_is_decompressed(synth, tmp_path):
    copy = copy_of(synth, tmp_path)
    plain = (copy / "synth-train-000001.tar").read_bytes()
    replace_shard(copy, "synth-train-000001.tar", gzip.compress(plain))
    with pytest.raises(
        DataError,
        match=r"synth-train-000001\.tar refused after 0 samples: it is gzip-compressed; "
        r"shards are plain, uncompressed tar",
    ):
        epoch_keys(str(copy))
    result = verify(copy)
    assert result.returncode == 1
    assert "synth-train-000001.tar: refused after 0 samples: it is gzip-compressed" in result.stdout


def huge_member_shard(claimed: int) -> bytes:
    """A tar whose one member's header claims `claimed` bytes, followed by 1 KiB: the disk holds almost nothing."""
    info = tarfile.TarInfo("big.png")
    info.size = claimed
    return info.tobuf(tarfile.PAX_FORMAT) + bytes(1024)


def test_a_member_claiming_2_gib_is_refused_from_its_header(synth, tmp_path):
    copy = copy_of(synth, tmp_path)
    replace_shard(copy, "synth-train-000002.tar", huge_member_shard(2 * 2**30))
    expected = (
        r"synth-train-000002\.tar refused after 0 samples: member 'big\.png' is 2147483648 bytes \(2048\.0 MiB\), "
        r"above the limit of 268435456 bytes \(256 MiB\) for one member; it was not read"
    )
    with pytest.raises(DataError, match=expected):
        epoch_keys(str(copy))
    result = verify(copy)
    assert (
        result.returncode == 1
        and "synth-train-000002.tar: refused after 0 samples: member 'big.png' is 2147483648 bytes" in result.stdout
    )
    # the limit is the source's: lowered, a real member is refused too
    shard = open_shard_set(str(synth), Limits(max_member_bytes=100)).shards[0]
    with pytest.raises(DataError, match=r"member 'train_\d+\.jpg' is \d+ bytes .* above the limit of 100 bytes"):
        list(read_shard(shard, range(shard.samples)))
    low = verify(synth, "--max-member-bytes", "100")
    assert low.returncode == 1 and "above the limit of 100 bytes" in low.stdout


# --- masks: convert what has one reading, refuse the rest ---------------------------------------


def test_masks_with_one_reading_are_converted_and_counted(tmp_path):
    rgb, mask = scene(24, 32, 1)
    binary = mask > 0
    image = Image.fromarray(rgb)
    sources = {
        "grey_rgb": Image.fromarray(np.dstack([mask] * 3)),
        "grey_palette": Image.fromarray(mask).convert("P"),
        "sixteen": Image.fromarray(binary.astype(np.uint16) * 65535),
        "plain": Image.fromarray(mask),
    }
    (tmp_path / "src" / "img").mkdir(parents=True)
    (tmp_path / "src" / "gt").mkdir()
    for name, m in sources.items():
        image.save(tmp_path / "src" / "img" / f"{name}.jpg")
        m.save(tmp_path / "src" / "gt" / f"{name}.png")
    write_png_rgb16(tmp_path / "src" / "gt" / "deep_grey.png", np.dstack([binary] * 3).astype(np.uint16) * 65535)
    image.save(tmp_path / "src" / "img" / "deep_grey.jpg")
    lines = []
    manifest = pack(tmp_path / "src", tmp_path / "out", images="img", masks="gt", workers=1, log=lines.append)
    out = by_source(tmp_path / "out")
    for name in ["grey_rgb", "grey_palette", "sixteen", "plain", "deep_grey"]:
        assert (out[f"{name}.jpg"][1] == mask).all(), name
    assert manifest["stats"]["mask_conversions"] == {"16-bit": 1, "grey RGB": 2, "grey palette": 1}
    assert "pack: masks converted: 16-bit (1), grey RGB (2), grey palette (1)" in lines
    assert "masks        converted: 16-bit (1), grey RGB (2), grey palette (1)" in describe(tmp_path / "out")


@pytest.mark.parametrize("kind", ["rgb", "palette", "rgba"])
def test_colour_masks_are_refused_naming_the_file_and_the_way_out(tmp_path, kind):
    rgb, mask = scene(24, 32, 2)
    colour = np.zeros((24, 32, 3), np.uint8)
    colour[mask > 0] = (255, 0, 0)  # red on black: read by one channel it is 1.0, as grey 0.3
    m = {
        "rgb": Image.fromarray(colour),
        "palette": Image.fromarray(colour).quantize(4),
        "rgba": Image.fromarray(np.dstack([colour, np.full((24, 32), 255, np.uint8)])),
    }[kind]
    write_pair(tmp_path / "src" / "img" / "ok.jpg", tmp_path / "src" / "gt" / "ok.png")
    Image.fromarray(rgb).save(tmp_path / "src" / "img" / "red.jpg")
    m.save(tmp_path / "src" / "gt" / "red.png")
    with pytest.raises(
        Exception,
        match=r"gt/red\.png: the mask is in colour \((RGB|palette): \d+ of 768 pixels are not grey, "
        r"the first at x=\d+, y=\d+ is RGB\(255, 0, 0\)\).*convert it to grey with the reading "
        r"you intend.*or pass --skip-bad",
    ):
        pack(tmp_path / "src", tmp_path / "out", images="img", masks="gt", workers=1)
    manifest = pack(
        tmp_path / "src", tmp_path / "out", images="img", masks="gt", workers=1, skip_bad=True, overwrite=True
    )
    assert manifest["total_samples"] == 1 and manifest["skipped"][0]["path"] == "gt/red.png"


def test_colour_under_full_transparency_is_not_seen(tmp_path):
    rgb, mask = scene(24, 32, 3)
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere, but only visible (alpha 255, and then white) inside the mask
    rgba[mask > 0] = (255, 255, 255, 255)
    (tmp_path / "src" / "img").mkdir(parents=True)
    (tmp_path / "src" / "gt").mkdir()
    Image.fromarray(rgb).save(tmp_path / "src" / "img" / "a.jpg")
    Image.fromarray(rgba).save(tmp_path / "src" / "gt" / "a.png")
    manifest = pack(tmp_path / "src", tmp_path / "out", images="img", masks="gt", workers=1)
    assert (by_source(tmp_path / "out")["a.jpg"][1] == mask).all()
    assert manifest["stats"]["mask_conversions"] == {"alpha": 1, "grey RGB": 1}


def raw_mask_shards(tmp_path, mask_bytes):
    rgb, _ = scene(24, 32, 0)
    return write_raw_shards(tmp_path / "raw", [("odd", "png", encode(Image.fromarray(rgb)), mask_bytes)])


def test_verify_reports_a_16_bit_or_colour_mask_in_a_shard_with_the_way_out(tmp_path):
    _, mask = scene(24, 32, 0)
    for name, data, described in [
        ("sixteen", encode(Image.fromarray(mask.astype(np.uint16) * 257)), "a 16-bit grey PNG"),
        ("rgb", encode(Image.fromarray(np.dstack([mask, mask // 3, mask // 3]))), "an 8-bit RGB PNG"),
    ]:
        shutil.rmtree(tmp_path / "raw", ignore_errors=True)
        raw_mask_shards(tmp_path, data)
        result = verify(tmp_path / "raw")
        assert result.returncode == 1, name
        assert (
            f"raw-000000.tar: sample 'odd': mask.png: the mask is {described}; a shard's mask is an 8-bit grey PNG: "
            "repack the source with `python -m salnet.shards pack`"
        ) in result.stdout, result.stdout


@loader_checks_headers
def test_the_loader_refuses_16_bit_and_colour_masks_instead_of_crashing_or_misreading(tmp_path):
    rgb, mask = scene(24, 32, 0)
    image = encode(Image.fromarray(rgb))
    for data, described in [
        (encode(Image.fromarray(mask.astype(np.uint16) * 257)), "a 16-bit grey PNG"),
        (encode(Image.fromarray(np.dstack([mask, mask // 3, mask // 3]))), "an 8-bit RGB PNG"),
    ]:
        raw = RawSample("s-000000.tar", 0, "odd", {"png": image, "mask.png": data})
        with pytest.raises(transforms.SampleError, match=f"sample 'odd' .*the mask is {described}"):
            transforms.decode_sample(raw)


# --- manifests that lie or are malformed --------------------------------------------------------


def test_a_shard_listed_twice_is_refused(synth, tmp_path):
    copy = copy_of(synth, tmp_path)

    def twice(m):
        m["shards"].append(dict(m["shards"][0]))
        m["total_samples"] += m["shards"][0]["samples"]
        m["total_bytes"] += m["shards"][0]["bytes"]

    edit_manifest(copy, twice)
    with pytest.raises(
        ManifestError, match=r"lists shard 'synth-train-000000\.tar' twice \(shards\[0\] and shards\[3\]\)"
    ):
        load_manifest(copy)
    with pytest.raises(DataError, match="twice"):
        epoch_keys(str(copy))


def test_a_manifest_counting_fewer_samples_than_the_shard_holds_stops_the_reader(synth, tmp_path):
    copy = copy_of(synth, tmp_path)

    def fewer(m):
        m["shards"][1]["samples"] -= 1
        m["total_samples"] -= 1

    edit_manifest(copy, fewer)
    load_manifest(copy)  # consistent in itself: only reading the shard can tell
    expected = (
        r"shard .*synth-train-000001\.tar holds more samples than its manifest says: sample #3 \('\w+'\) follows the 3 "
        r"it lists \(the shard has at least 4, the manifest says 3\)"
    )
    with pytest.raises(DataError, match=expected):
        epoch_keys(str(copy))  # batch 1: every sample is read
    shard = open_shard_set(str(copy)).shards[1]
    with pytest.raises(DataError, match=expected):
        list(read_shard(shard, [0, 1, 2]))
    with pytest.raises(DataError, match=expected):
        list(read_shard(shard, [0, 1]))  # a reader that wants only the first samples reads on to the end too
    assert "holds 4 samples, the manifest says 3" in verify(copy).stdout


def test_a_surplus_in_the_samples_an_epoch_leaves_out_still_stops_the_run(synth, tmp_path):
    # One shard of 4 listed as 3, batches of 2: each epoch uses 2 samples and leaves 1 out, so no
    # reader needs the listed end of the shard, after which the surplus sample lies.
    copy = copy_of(synth, tmp_path)
    edit_manifest(
        copy,
        lambda m: m.update(
            shards=[dict(m["shards"][1], samples=3)], total_samples=3, total_bytes=m["shards"][1]["bytes"]
        ),
    )
    for epoch in range(3):
        with pytest.raises(DataError, match=r"synth-train-000001\.tar holds more samples .* \('train_000007'\)"):
            epoch_keys(str(copy), batch_size=2, epoch=epoch)


# --- keys a shard could lie with ------------------------------------------------------------------


def sample_renamed(index: int, key: str):
    """rename_members's rename: the members of the shard's sample #index get the key `key`."""
    return lambda i, name: key + name[name.index(".") :] if i // 3 == index else name


@pytest.mark.parametrize(
    "rename,found,verify_says",
    [
        # The second sample takes the first one's key: its members would overwrite the first's.
        (
            sample_renamed(1, "train_000000"),
            r"sample 'train_000000' \(#0\) has a second member 'train_000000\.jpg'",
            "sample 'train_000000' has 'jpg' twice",
        ),
        # The fourth takes the first's key, three samples later.
        (
            sample_renamed(3, "train_000000"),
            r"sample key 'train_000000' occurs twice: samples #0 and #3",
            "keys occur more than once (in one shard or across shards): train_000000",
        ),
    ],
    ids=["next", "later"],
)
def test_a_key_repeated_within_a_shard_stops_the_reader_naming_shard_and_key(
    synth, tmp_path, rename, found, verify_says
):
    copy = copy_of(synth, tmp_path)
    rename_members(copy, "synth-train-000000.tar", rename)
    expected = r"shard .*synth-train-000000\.tar: " + found
    with pytest.raises(DataError, match=expected):
        list(read_shard(open_shard_set(str(copy)).shards[0], [0]))  # found while reading, wanted or not
    with pytest.raises(DataError, match=expected):
        epoch_keys(str(copy))
    assert verify_says in verify(copy).stdout


@pytest.mark.parametrize("key", ["/tmp/salnet-escape", "sub/x", "a\\b", "a b", ""])
def test_a_key_that_is_a_path_or_empty_is_refused_where_shards_are_read(synth, tmp_path, key):
    copy = copy_of(synth, tmp_path)
    rename_members(copy, "synth-train-000000.tar", sample_renamed(1, key))
    named = f"member {key + '.jpg'!r} has the sample key {key!r}, not a valid key"
    expected = (
        rf"shard .*synth-train-000000\.tar: {re.escape(named)} \(one or more letters, digits, '-' and '_', so no '/'"
    )
    with pytest.raises(DataError, match=expected):
        list(read_shard(open_shard_set(str(copy)).shards[0], [0]))
    with pytest.raises(DataError, match=expected):
        epoch_keys(str(copy))
    with pytest.raises(DataError, match=expected):
        list(ValStream(DataConfig(train=[str(copy)], val=[str(copy)], workers=0, eval_size=32), 0, 1))
    result = verify(copy)
    assert result.returncode == 1 and named in result.stdout


def test_predict_refuses_a_key_that_would_write_outside_out(synth, tmp_path):
    escape = tmp_path / "escaped"  # the key: an absolute path outside --out
    assert "." not in str(escape), "a key holds no dot"
    copy = copy_of(synth, tmp_path)
    # Its KEY.json renamed KEY.txt: without one, predict names the map by the key itself.
    renamed = sample_renamed(0, str(escape))
    rename_members(copy, "synth-train-000000.tar", lambda i, name: renamed(i, name).replace(".json", ".txt"))
    out = tmp_path / "maps"
    checkpoint = tiny_checkpoint(tmp_path / "run")
    result = forked_run(
        ["-m", "salnet.predict", "--checkpoint", checkpoint, str(copy), "--out", out, "--workers", "0"], check=False
    )
    assert result.returncode != 0
    assert f"has the sample key '{escape}', not a valid key" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("escaped*")) and not list(out.rglob("*.png"))


@pytest.mark.parametrize("stem", ["/tmp/x", "../x", "a/b", "a/../../x"])
def test_predict_writes_a_map_only_in_its_dataset_folder(tmp_path, stem):
    where = "shard s.tar, sample 'k' (#0)"
    assert map_path(tmp_path, Prepared("ds", "k", where, (1, 1), [])) == tmp_path / "ds" / "k.png"
    with pytest.raises(EvaluationError, match=rf"^{re.escape(where)}: the map name '{re.escape(stem)}\.png' is a path"):
        map_path(tmp_path, Prepared("ds", stem, where, (1, 1), []))


def test_members_named_dot_slash_key_are_reported_as_such_not_as_a_truncated_shard(synth, tmp_path):
    # What `tar -C DIR .` writes: every member's name starts with './'.
    copy = copy_of(synth, tmp_path)
    rename_members(copy, "synth-train-000000.tar", lambda i, name: "./" + name)
    expected = r"member '\./train_000000\.jpg' has the sample key '', not a valid key .*; its './' prefix is what `tar -C DIR \.` writes"
    with pytest.raises(DataError, match=expected):
        epoch_keys(str(copy))
    result = verify(copy)
    assert result.returncode == 1 and re.search(expected, result.stdout), result.stdout
    assert "(and 11 more members like it)" in result.stdout and "unexpected member" not in result.stdout


def test_a_manifest_without_shards_fails_verify_and_load(synth, tmp_path):
    copy = copy_of(synth, tmp_path)
    edit_manifest(copy, lambda m: m.update(shards=[], total_samples=0, total_bytes=0))
    result = verify(copy)
    assert result.returncode == 2 and "lists no shards" in result.stderr
    with pytest.raises(DataError, match="lists no shards"):
        epoch_keys(str(copy))


@pytest.mark.parametrize(
    "name",
    [
        "../synth-train-000000.tar",
        "/tmp/x.tar",
        "a;touch PWNED;.tar",
        "-rf.tar",
        ".hidden.tar",
        "a b.tar",
        "a\nb.tar",
        "$(id).tar",
        "x.tar/",
        "sub/x.tar",
        "x'y.tar",
        "x.zip",
    ],
)
def test_shard_names_must_be_plain_file_names(synth, tmp_path, name):
    copy = copy_of(synth, tmp_path)
    edit_manifest(copy, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(
        ManifestError, match=r"shards\[0\]\.file must be a plain \.tar file name in the shard directory"
    ):
        load_manifest(copy)
    if not name.endswith(".zip"):
        with pytest.raises(DataError, match="not a plain file name"):
            file_url("pipe:ssh host cat /data/{}", name)


def test_a_remote_manifest_cannot_put_a_command_into_a_pipe_source(synth, tmp_path, monkeypatch):
    """`ssh host cat DIR/{}` hands its arguments to a second shell on the host; `sh -c` is that second shell here."""
    copy = copy_of(synth, tmp_path)
    evil = "x;touch PWNED;.tar"
    (copy / evil).write_bytes((copy / "synth-train-000000.tar").read_bytes())
    edit_manifest(copy, lambda m: m["shards"][0].update(file=evil))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        DataError, match=r"shards\[0\]\.file must be a plain \.tar file name .* got 'x;touch PWNED;\.tar'"
    ):
        epoch_keys(f"pipe:sh -c 'cd {copy} && cat {{}}'")
    assert not list(tmp_path.rglob("PWNED"))


def test_info_reports_or_refuses_every_degenerate_manifest(synth, tmp_path):
    copy = copy_of(synth, tmp_path)
    good = json.loads((copy / "manifest.json").read_text())
    nan = float("nan")
    edits = [
        {"shards": [], "total_samples": 0, "total_bytes": 0},
        {"stats": {}},
        {
            "stats": {
                "stored_height": {"min": 1},
                "stored_width": "wide",
                "foreground_ratio": {"min": nan, "max": nan, "median": nan, "mean": nan},
            }
        },
        {
            "stats": {
                "soft_masks": "many",
                "images_kept_original": True,
                "image_conversions": ["x"],
                "mask_conversions": 3,
            }
        },
        {"options": "fast"},
        {"options": [1, 2]},
        {"source": "disk"},
        {"source": {}},
        {"source": None},
        {"resized": "all"},
        {"resized": [{"image": 1}, 5]},
        {"pillow_version": None},
        {"skipped": [{"path": "a"}]},
        {"skipped": ["x"]},
        {"skipped": {"a": 1}},
        {"total_bytes": 1},
        {"total_samples": -12},
        {"name": 5},
        {"command": None},
    ]
    shard_edits = [{"samples": 0}, {"samples": -4}, {"bytes": -1}, {"sha256": "zz"}, {"samples": 4.0}, {"file": 7}]
    outcomes = []
    for edit in edits + [{"shards": [{**good["shards"][0], **e}] + good["shards"][1:]} for e in shard_edits]:
        (copy / "manifest.json").write_text(json.dumps({**good, **edit}))
        try:
            text = describe(copy)
        except ManifestError as e:
            assert "manifest.json" in str(e)
            outcomes.append("refused")
        else:
            assert text.startswith("dataset      synth-train")
            outcomes.append("described")
    assert outcomes.count("refused") >= 13 and outcomes.count("described") >= 10, outcomes


# --- process counts far above the machine ---------------------------------------------------------


def test_a_worker_count_far_above_the_cpus_is_refused_before_a_process_starts(synth, capsys):
    workers = 4 * available_cpus() + 1
    far_above = rf"{workers} worker processes are far above the {available_cpus()} CPUs this process may use"
    cfg = DataConfig(train=[str(synth)], val=[str(synth)], size=16, workers=workers)
    with pytest.raises(DataError, match=rf"^data\.workers .* = {workers}: {far_above}: at most {workers - 1}"):
        TrainStream(cfg, seed=0, rank=0, world_size=1)  # would be part of the data order: refused, not capped
    with pytest.raises(DataError, match=far_above):
        ValStream(cfg, 0, 1)
    with pytest.raises(DataError, match=far_above):
        loader_workers(workers, 10)  # predict's --workers
    assert loader_workers(workers - 1, 10) == min(workers - 1, 10)
    for command in ("verify", "synth"):
        args = [command, str(synth), "--workers", str(workers)] + (
            ["--train", "1", "--val", "1"] * (command == "synth")
        )
        with pytest.raises(SystemExit) as exit:
            shards_main(args)
        assert exit.value.code == 2 and re.search(rf"argument --workers: {far_above}", capsys.readouterr().err)
