"""Data sources: local directories, file://, pipe: and http:// read the same samples; s3:// maps to
`aws s3 cp`; incomplete or damaged sources stop with the name of what is wrong."""

import functools
import http.server
import shutil
import threading

import pytest

from salnet.config import DataConfig
from salnet.data import DataError, TrainStream
from salnet.data.sources import file_url
from salnet.shards.synth import synthesize


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    synthesize(root, train=12, val=2, size=32, shard_samples=4)
    return root


def epoch_keys(location: str) -> list[list[str]]:
    cfg = DataConfig(train=[location], val=[], size=16, batch_size=3, workers=1, shuffle_buffer=3)
    return [b["key"] for b in TrainStream(cfg, seed=0, rank=0, world_size=1).epoch_batches(0)]


def damaged_copy(shards, tmp_path, damage) -> str:
    copy = tmp_path / "train"
    shutil.copytree(shards / "train", copy)
    damage(copy)
    return str(copy)


def test_file_and_pipe_sources_read_the_same_samples_as_a_local_directory(shards):
    local = epoch_keys(str(shards / "train"))
    assert len(local) == 4
    assert epoch_keys(f"file://{shards / 'train'}") == local
    assert epoch_keys(f"pipe:cat {shards / 'train'}/{{}}") == local


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="webdataset reads http(s) through curl, which is not installed"
)
def test_http_source_reads_the_same_samples(shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert epoch_keys(f"{url}/train") == epoch_keys(str(shards / "train"))
        with pytest.raises(DataError, match=r"cannot read its manifest\.json .*/nowhere/manifest\.json"):
            epoch_keys(f"{url}/nowhere")
    finally:
        server.shutdown()
        server.server_close()


def test_s3_and_pipe_urls():
    assert (
        file_url("s3://bucket/duts/train/", "duts-000001.tar")
        == "pipe:aws s3 cp s3://bucket/duts/train/duts-000001.tar -"
    )
    assert file_url("pipe:ssh host cat '/data/a b/{}'", "x-000000.tar") == "pipe:ssh host cat '/data/a b/x-000000.tar'"
    with pytest.raises(DataError, match=r"needs \{\} where the file name goes"):
        file_url("pipe:cat /data/train", "manifest.json")
    with pytest.raises(DataError, match="unsupported scheme"):
        file_url("ftp://host/train", "manifest.json")


def test_a_source_without_manifest_is_refused(shards, tmp_path):
    location = damaged_copy(shards, tmp_path, lambda d: (d / "manifest.json").unlink())
    with pytest.raises(DataError, match=r"has no manifest\.json"):
        epoch_keys(location)


def test_a_missing_shard_stops_with_its_name(shards, tmp_path):
    location = damaged_copy(shards, tmp_path, lambda d: (d / "synth-train-000001.tar").unlink())
    with pytest.raises(DataError, match=r"synth-train-000001\.tar', which is missing"):
        epoch_keys(location)


def truncate(directory, fraction=0.5):
    shard = directory / "synth-train-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * fraction)])


def test_a_truncated_shard_stops_with_its_name(shards, tmp_path):
    location = damaged_copy(shards, tmp_path, truncate)
    with pytest.raises(DataError, match=r"synth-train-000002\.tar' has \d+ bytes, the manifest says"):
        epoch_keys(location)
    # Through a pipe there is no size to check up front: the reader finds the damage (a cut inside a
    # member is unreadable; a cut at a member boundary looks like an early end of the archive).
    with pytest.raises(
        DataError, match=r"shard synth-train-000002\.tar \(via pipe:cat .*\) (is unreadable|ended) after \d+ samples"
    ):
        epoch_keys(f"pipe:cat {location}/{{}}")
