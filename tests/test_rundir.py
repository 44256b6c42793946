"""salnet.run.rundir: the run directory's rules (metrics.jsonl, the lock, leftovers, start-over)."""

import json
import subprocess
import sys

import pytest
from test_train import tiny_config

from salnet.run.rundir import MetricsFile, RunDir, RunDirLocked, RunDirUnsafe, RunLock, read_records
from salnet.shards.synth import synthesize

from conftest import forked_run


def write_rows(path, steps, tail=b""):
    path.write_bytes(b"".join(json.dumps({"kind": "train", "step": s}).encode() + b"\n" for s in steps) + tail)


def test_a_torn_last_line_is_ignored_by_readers_and_cut_on_resume(tmp_path, caplog):
    metrics = MetricsFile(tmp_path)
    write_rows(metrics.path, [1, 2, 3], tail=b'{"kind": "train", "st')
    assert [r["step"] for r in read_records(metrics.path)] == [1, 2, 3]  # readers never fail on it
    with caplog.at_level("WARNING", logger="salnet"):
        metrics.resume_at(3)
    assert "cut a torn last line of 21 bytes" in caplog.text
    assert metrics.path.read_bytes().endswith(b"}\n")
    metrics.append({"kind": "train", "step": 4})
    assert [r["step"] for r in read_records(metrics.path)] == [1, 2, 3, 4]


def test_rows_a_resume_replaces_are_kept_in_a_side_file(tmp_path):
    metrics = MetricsFile(tmp_path)
    write_rows(metrics.path, [1, 2, 3, 4, 5])
    metrics.resume_at(3)
    assert [r["step"] for r in read_records(metrics.path)] == [1, 2, 3]
    side = read_records(metrics.replaced_path)
    assert side[0]["kind"] == "replaced" and side[0]["resumed_at_step"] == 3
    assert [r["step"] for r in side[1:]] == [4, 5]


def test_a_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_records(path)


HOLD = """
import sys, time
from salnet.run.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_one_writer_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={"SLURM_JOB_ID": "4242", "PATH": ""},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert (
            str(tmp_path) in msg
            and f'"pid": {holder.pid}' in msg
            and '"slurm_job_id": "4242"' in msg
            and '"host"' in msg
        )
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_leftovers_of_crashes_go_and_start_over_stays_inside_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-00000005.tmp").mkdir(parents=True)
    (run / ".best.pt.abc123.tmp").write_bytes(b"half")
    (run / "checkpoints" / "step-00000004").mkdir()
    assert sorted(p.name for p in RunDir(run).remove_leftovers()) == [".best.pt.abc123.tmp", ".step-00000005.tmp"]
    assert (run / "checkpoints" / "step-00000004").is_dir()
    # a symlink to data elsewhere: start-over removes the link, never what it points at
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    RunDir(run).best.symlink_to(outside / "keep.txt")
    (run / "config.yaml").write_text("kept: the new attempt overwrites it")
    removed = sorted(RunDir(run).start_over())
    assert removed == [RunDir(run).best, RunDir(run).checkpoints]
    assert (outside / "keep.txt").read_text() == "keep" and (run / "config.yaml").exists()


@pytest.fixture
def outside(tmp_path):
    """Files of someone else's, beside the run directory."""
    (tmp_path / "elsewhere" / "checkpoints").mkdir(parents=True)
    (tmp_path / "elsewhere" / "plots").mkdir()
    for name in (".lock", "metrics.jsonl", "metrics.replaced.jsonl", "plots/latest.npz"):
        (tmp_path / "elsewhere" / name).write_text("someone else's\n")
    return tmp_path / "elsewhere"


def untouched(outside):
    return all(p.read_text() == "someone else's\n" for p in outside.rglob("*") if p.is_file())


@pytest.mark.parametrize("entry", [".lock", "metrics.jsonl", "checkpoints", "plots/latest.npz"])
def test_a_run_directory_whose_files_lead_outside_it_is_refused(tmp_path, outside, entry):
    run = tmp_path / "run"
    (run / "plots" / "old").mkdir(parents=True)
    (run / "plots" / "latest").symlink_to("old")  # a link that stays inside is fine
    (run / "wandb" / "run-1").mkdir(parents=True)
    (run / "wandb" / "run-1" / "core.log").symlink_to(outside / ".lock")  # W&B's own links are W&B's
    (run / entry).symlink_to(outside / entry)
    with pytest.raises(RunDirUnsafe, match=f"{run / entry}: a symlink"):
        RunLock(run).acquire()
    assert untouched(outside)
    (run / entry).unlink()
    lock = RunLock(run)
    lock.acquire()  # without it, the run is the writer's again
    lock.release()


def test_the_run_log_never_writes_through_a_link_that_appears_during_the_run(tmp_path, outside):
    metrics = MetricsFile(tmp_path)
    metrics.path.symlink_to(outside / "metrics.jsonl")
    with pytest.raises(RunDirUnsafe, match=f"{metrics.path}: a symlink"):
        metrics.append({"kind": "train", "step": 1})
    metrics.path.unlink()
    write_rows(metrics.path, [1, 2, 3])
    metrics.replaced_path.symlink_to(outside / "metrics.replaced.jsonl")
    with pytest.raises(RunDirUnsafe, match=f"{metrics.replaced_path}: a symlink"):
        metrics.resume_at(2)
    assert untouched(outside)


def test_salnet_train_says_why_it_refuses_a_run_directory_in_one_line(tmp_path, outside):
    train, val = synthesize(tmp_path / "shards", train=8, val=2, size=64, seed=0)
    path, run = tiny_config(tmp_path, {"train": train, "val": val})
    run.mkdir(parents=True)
    (run / ".lock").symlink_to(outside / ".lock")
    result = forked_run(["-m", "salnet.train", "--config", path], check=False)
    assert result.returncode == 1
    assert f"[rank 0] RunDirUnsafe: {run / '.lock'}: a symlink" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert untouched(outside)
