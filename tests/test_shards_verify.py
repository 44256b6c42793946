"""`verify` and `info` on real shards, intact and damaged."""

import tarfile

import pytest

from salnet.shards.synth import synthesize

from conftest import run_py


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    train, _ = synthesize(tmp_path_factory.mktemp("synth"), train=40, val=4, size=48, shard_samples=10)
    return train


def damaged_copy(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in shard_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    return copy


def member_offset(shard, name_suffix, index=0):
    with tarfile.open(shard) as tar:
        members = [m for m in tar if m.name.endswith(name_suffix)]
    return members[index].offset_data, members[index].size, members[index].name.split(".")[0]


def verify(path):
    return run_py(["-m", "salnet.shards", "verify", path, "--workers", "2"], check=False)


def test_verify_passes_intact_shards(shard_dir):
    result = verify(shard_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: OK" in result.stdout and "4 shards, 40 samples" in result.stdout


def test_verify_catches_a_flipped_byte_and_names_shard_and_sample(shard_dir, tmp_path):
    copy = damaged_copy(shard_dir, tmp_path)
    shard = copy / "synth-train-000001.tar"
    data = bytearray(shard.read_bytes())
    offset, size, _ = member_offset(shard, ".jpg", 3)
    data[offset + size // 2] ^= 0x01  # one bit inside the JPEG scan: may still decode, but the hash changes
    offset, size, bad_key = member_offset(shard, ".mask.png", 5)
    data[offset + 40 : offset + size - 12] = bytes(size - 52)  # the mask's compressed data zeroed: cannot decode
    shard.write_bytes(bytes(data))
    result = verify(copy)
    assert result.returncode == 1
    assert "synth-train-000001.tar: sha256 differs from the manifest" in result.stdout
    assert f"synth-train-000001.tar: sample '{bad_key}': mask.png does not decode" in result.stdout
    assert "synth-train-000000.tar" not in result.stdout  # intact shards are not blamed


def test_verify_catches_a_missing_shard(shard_dir, tmp_path):
    copy = damaged_copy(shard_dir, tmp_path)
    (copy / "synth-train-000002.tar").unlink()
    result = verify(copy)
    assert result.returncode == 1
    assert "synth-train-000002.tar: missing" in result.stdout
    assert "the shards hold 30 samples, the manifest's total_samples is 40" in result.stdout


def test_verify_refuses_a_directory_without_manifest(tmp_path):
    result = verify(tmp_path)
    assert result.returncode == 2 and "has no manifest.json" in result.stderr


def test_info_reports_counts_statistics_and_how_it_was_packed(shard_dir):
    out = run_py(["-m", "salnet.shards", "info", shard_dir]).stdout
    assert "samples      40 in 4 shards" in out
    assert "layout       synth" in out and "salnet.shards.synth.synthesize(" in out
    assert "stored H x W 48..48" in out and "foreground   " in out and "skipped      0" in out


def test_verify_catches_a_corrupt_tar_header_that_tarfile_would_pass_over(shard_dir, tmp_path):
    copy = damaged_copy(shard_dir, tmp_path)
    shard = copy / "synth-train-000003.tar"
    data = bytearray(shard.read_bytes())
    offset, _, _ = member_offset(shard, ".json", 4)
    data[offset - 512 + 10] ^= 0x20  # inside the next-to-read header's name field: its checksum no longer matches
    shard.write_bytes(bytes(data))
    result = verify(copy)
    assert result.returncode == 1
    assert "synth-train-000003.tar: tar structure broken at byte" in result.stdout
    assert "has members ['jpg', 'mask.png']; a sample needs" in result.stdout  # the sample cut short
    assert "synth-train-000003.tar: holds 5 samples, the manifest says 10" in result.stdout
