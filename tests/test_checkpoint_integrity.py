"""Checkpoints that prove they are intact: checksums, fallback past bad ones, rollback, best.pt's
digest, and a save that runs out of disk space on a real (tmpfs) filesystem."""

import json
import subprocess
import uuid

import pytest
import torch

from salnet.config import load_config, save_config
from salnet.run.checkpoint import (
    CheckpointSaveError,
    ClientState,
    choose_checkpoint,
    load_best,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from salnet.run.checksums import MANIFEST, CheckpointCorrupt, file_digest, tensor_digest, verify
from salnet.run.rundir import RunDir
from salnet.run.state import Best, TrainState
from salnet.strategy import build_strategy, convert
from salnet.trainer import Trainer
from salnet.validate import best_key

from strategy_probe import TinyNet


def client(step):
    return ClientState(train=TrainState(step=step), world_size=1, loader=[{}], rng=[{}])


def saved_run(run_dir, steps=(2, 4, 6), net=None, config=None):
    cfg = load_config(None, ["train.channels_last=false"])
    strategy = build_strategy(cfg, net or TinyNet(), total_steps=10)
    for step in steps:
        save_checkpoint(run_dir, step, strategy, client(step), keep=10, config=config)
    return strategy


def flip_byte(path, fraction=0.75):
    data = bytearray(path.read_bytes())
    data[int(len(data) * fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_file_is_listed_with_size_and_checksum(tmp_path):
    saved_run(tmp_path, steps=(2,))
    checkpoint = RunDir(tmp_path).complete_checkpoints()[0]
    files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    digest = file_digest(checkpoint / "state.pt")  # computed while writing: the same as reading it back
    assert files["state.pt"] == {"size": digest.size, "xxh3_128": digest.xxh3_128}
    verify(checkpoint)


def test_auto_sets_bad_checkpoints_aside_and_resumes_from_the_newest_good_one(tmp_path, capsys):
    strategy = saved_run(tmp_path)
    newest = tmp_path / "checkpoints" / "step-00000006" / "state.pt"
    flip_byte(newest)
    torch.load(newest, weights_only=True)  # torch alone would load the flipped tensor without a word
    chosen = choose_checkpoint(tmp_path, "auto")
    assert chosen.name == "step-00000004" and load_checkpoint(chosen, strategy) == client(4)
    out = capsys.readouterr().out
    assert f"{newest}: checksum mismatch" in out and "corrupt-step-00000006" in out
    assert (tmp_path / "checkpoints" / "corrupt-step-00000006" / "state.pt").is_file()  # never deleted

    # truncated (a copy cut short) and a missing manifest: each is named; none left -> an error listing them
    state = tmp_path / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    (tmp_path / "checkpoints" / "step-00000002" / MANIFEST).unlink()
    with pytest.raises(CheckpointCorrupt) as e:
        choose_checkpoint(tmp_path, "auto")
    msg = str(e.value)
    assert f"{state}: 100 bytes" in msg and f"{tmp_path / 'checkpoints' / 'step-00000002' / MANIFEST}: missing" in msg
    assert "train.resume=none" in msg


def test_a_manifest_that_does_not_list_every_file_makes_the_checkpoint_bad(tmp_path, capsys):
    saved_run(tmp_path, config={"saved": "with its config.json"})
    checkpoints = tmp_path / "checkpoints"
    for step, listed in [(6, []), (4, ["config.json"])]:  # emptied; cut short
        manifest = checkpoints / f"step-0000000{step}" / MANIFEST
        content = json.loads(manifest.read_text())
        content["files"] = {name: content["files"][name] for name in listed}
        manifest.write_text(json.dumps(content))
        flip_byte(manifest.parent / "state.pt")
    assert choose_checkpoint(tmp_path, "auto").name == "step-00000002"
    out = capsys.readouterr().out
    assert f"{checkpoints / 'step-00000006' / MANIFEST}: lists no files" in out
    assert f"{checkpoints / 'step-00000004' / 'state.pt'}: not listed in" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "corrupt-step-00000004",
        "corrupt-step-00000006",
        "step-00000002",
    ]


def test_an_explicit_bad_checkpoint_is_an_error_not_a_fallback(tmp_path):
    saved_run(tmp_path)
    bad = tmp_path / "checkpoints" / "step-00000004"
    flip_byte(bad / "state.pt")
    with pytest.raises(CheckpointCorrupt, match=f"{bad / 'state.pt'}: checksum mismatch"):
        choose_checkpoint(tmp_path, str(bad))
    assert [p.name for p in RunDir(tmp_path).complete_checkpoints()] == [
        "step-00000002",
        "step-00000004",
        "step-00000006",
    ]


def test_rolling_back_moves_the_newer_checkpoints_aside_so_auto_continues_the_chosen_branch(tmp_path):
    saved_run(tmp_path)
    chosen = choose_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-00000002"))
    assert chosen.name == "step-00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "abandoned-step-00000004",
        "abandoned-step-00000006",
        "step-00000002",
    ]
    assert choose_checkpoint(tmp_path, "auto").name == "step-00000002"


def test_resuming_from_another_runs_checkpoint_copies_it_and_leaves_that_run_alone(tmp_path):
    other, run = tmp_path / "other", tmp_path / "run"
    saved_run(other)
    saved_run(run, steps=(2, 4, 8))
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    chosen = choose_checkpoint(run, str(other / "checkpoints" / "step-00000004"))
    assert chosen == RunDir(run).checkpoint(4)
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before  # not one byte of it changed
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "abandoned-step-00000004",  # this run's own step 4: the copy of the other one's replaces it
        "abandoned-step-00000008",
        "step-00000002",
        "step-00000004",
    ]
    assert (chosen / "state.pt").read_bytes() == before[other / "checkpoints" / "step-00000004" / "state.pt"]
    assert choose_checkpoint(run, "auto") == chosen


def test_a_step_set_aside_again_keeps_every_copy(tmp_path):
    strategy = saved_run(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    for _ in range(2):  # roll back to step 2 twice: steps 4 and 6 were saved again in between
        choose_checkpoint(tmp_path, str(checkpoints / "step-00000002"))
        for step in (4, 6):
            save_checkpoint(tmp_path, step, strategy, client(step), keep=10)
    for _ in range(2):  # step 6 found corrupt twice
        flip_byte(checkpoints / "step-00000006" / "state.pt")
        assert choose_checkpoint(tmp_path, "auto").name == "step-00000004"
        save_checkpoint(tmp_path, 6, strategy, client(6), keep=10)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "abandoned-step-00000004",
        "abandoned-step-00000004.2",
        "abandoned-step-00000006",
        "abandoned-step-00000006.2",
        "corrupt-step-00000006",
        "corrupt-step-00000006.2",
        "step-00000002",
        "step-00000004",
        "step-00000006",
    ]


def test_a_load_error_names_its_file(tmp_path):
    strategy = saved_run(tmp_path, steps=(2,))
    checkpoint = RunDir(tmp_path).complete_checkpoints()[0]
    (checkpoint / "state.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(RuntimeError, match=f"{checkpoint / 'state.pt'}: cannot be loaded"):
        load_checkpoint(checkpoint, strategy)


def test_best_pt_carries_a_digest_of_its_weights(tmp_path):
    weights = {k: v.float() for k, v in TinyNet().state_dict().items()}
    path = save_best(tmp_path, weights, {}, {"val/maxF": 0.5}, 3)
    assert load_best(path)["step"] == 3
    best = torch.load(path, weights_only=True)
    best["model"]["head.bias"] += 1e-3  # a changed tensor under an intact pickle
    torch.save(best, path)
    with pytest.raises(CheckpointCorrupt, match=f"{path}: its weights, config or metrics do not match their checksum"):
        load_best(path)
    # a best.pt of salnet before issue 22: a digest of its weights only, still checked
    legacy = {k: v for k, v in best.items() if k != "xxh3_128"}
    torch.save({**legacy, "weights_xxh3_128": tensor_digest(weights)}, path)
    with pytest.raises(CheckpointCorrupt, match=f"{path}: its weights do not match their checksum"):
        load_best(path)


def test_best_pt_digest_covers_its_config_and_metrics(tmp_path):
    weights = {k: v.float() for k, v in TinyNet().state_dict().items()}
    config = load_config(None).model_dump(mode="json")
    for section, key, value in [
        ("config", "data", {**config["data"], "eval_size": 999}),
        ("metrics", "val/maxF", 0.99),
    ]:
        path = save_best(tmp_path, weights, config, {"val/maxF": 0.5}, 3)
        best = torch.load(path, weights_only=True)
        best[section][key] = value  # what predict and evaluate would act on
        torch.save(best, path)
        with pytest.raises(CheckpointCorrupt, match=f"{path}: its weights, config or metrics do not match"):
            load_best(path)


def test_convert_verifies_the_checkpoint_first(tmp_path, capsys):
    cfg = load_config(None, ["train.channels_last=false", "model.factory=strategy_probe:tiny_net"])
    save_config(cfg, RunDir(tmp_path).config)
    saved_run(tmp_path, steps=(2,), config=cfg.model_dump(mode="json"))
    checkpoint = RunDir(tmp_path).checkpoint(2)
    assert load_best(convert.convert(checkpoint, tmp_path / "intact"))["step"] == 2
    flip_byte(checkpoint / "state.pt")
    with pytest.raises(SystemExit) as e:
        convert.main([str(checkpoint), str(tmp_path / "exported")])
    assert e.value.code == 2 and not (tmp_path / "exported" / "best.pt").exists()
    assert capsys.readouterr().err.splitlines() == [
        f"python -m salnet.strategy.convert: {checkpoint / 'state.pt'}: checksum mismatch "
        "(its bytes changed after it was written)"
    ]


class _Scores:
    """What validate_and_keep_best asks of the validator and the run log, without data or a network."""

    def __init__(self, cfg, scores):
        self.cfg, self.last_details, self.next = cfg, {}, scores

    def __call__(self, predict):
        return self.next

    def best_value(self, scores):
        return scores[best_key(self.cfg)]

    def print(self, text):
        pass

    def validation(self, *args):
        pass


def test_a_resume_that_changes_best_metric_starts_the_best_anew(tmp_path):
    """maxE decided best.pt before the resume; maxF decides after it: 0.4 maxF is no worse than 0.9 maxE."""
    trainer = Trainer.__new__(Trainer)  # only the part that keeps the best
    trainer.strategy = build_strategy(load_config(None, ["train.channels_last=false"]), TinyNet(), total_steps=12)
    state = TrainState()
    for step, metric, scores, best_step in [
        (3, "maxE", {"val/maxE": 0.9, "val/maxF": 0.3}, 3),
        (6, "maxF", {"val/maxE": 0.5, "val/maxF": 0.4}, 6),  # the first validation under maxF
        (9, "maxF", {"val/maxE": 0.95, "val/maxF": 0.35}, 6),
        (12, "maxF", {"val/maxE": 0.1, "val/maxF": 0.45}, 12),
    ]:
        cfg = load_config(
            None, ["train.channels_last=false", f"out_dir={tmp_path}", "name=run", f"eval.best_metric={metric}"]
        )
        trainer.cfg, trainer.run_dir = cfg, RunDir(cfg.run_dir)
        trainer.validator = log = _Scores(cfg, scores)
        state.step = step
        trainer.validate_and_keep_best(state, log)
        assert load_best(RunDir(cfg.run_dir).best)["step"] == best_step, step
    assert state.best == Best("maxF", 0.45, 12)


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 3 MiB tmpfs (root only); skipped, saying why, where mounting is not allowed."""
    mount = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): the disk-full test needs a small real filesystem"
        )
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_the_save_cleanly_and_keeps_the_earlier_checkpoints(small_filesystem):
    net = torch.nn.Sequential(
        torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    )  # ~0.5 MiB of weights, 1.5 MiB with AdamW
    cfg = load_config(None, ["train.channels_last=false"])
    strategy = build_strategy(cfg, net, total_steps=10)
    run_dir = small_filesystem / "run"
    save_checkpoint(run_dir, 1, strategy, client(1), keep=10)  # the optimizer has no state yet: small
    strategy.optimizer.step()  # AdamW's moments now exist: the next checkpoint is three times larger
    with pytest.raises(CheckpointSaveError) as e:
        for step in range(2, 10):
            save_checkpoint(run_dir, step, strategy, client(step), keep=10)
    msg = str(e.value)
    assert f"into {run_dir / 'checkpoints'} failed" in msg and "No space left on device" in msg, msg
    assert "bytes are free there" in msg and "A checkpoint takes about" in msg
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "the failed save's temporary directory is gone"
    for checkpoint in RunDir(run_dir).complete_checkpoints():
        verify(checkpoint)  # everything saved before is intact
    assert RunDir(run_dir).complete_checkpoints()


def test_every_file_of_a_run_honours_the_umask(tmp_path):
    import os
    import stat

    from salnet.config import save_config
    from salnet.run.rundir import MetricsFile

    old = os.umask(0o027)
    try:
        saved_run(tmp_path, steps=(2,))
        save_best(tmp_path, {k: v.float() for k, v in TinyNet().state_dict().items()}, {}, {}, 2)
        save_config(load_config(None), tmp_path / "config.yaml")
        MetricsFile(tmp_path).append({"kind": "train", "step": 1})
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {RunDir(tmp_path).best.name, "config.yaml", "state.pt", MANIFEST, "metrics.jsonl"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o640) for p in files}
