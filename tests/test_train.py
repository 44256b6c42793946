"""The main job end to end: real processes, real shards, real gloo groups (CPU, resnet18, 64 px)."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from salnet.config import load_config
from salnet.data import ValStream
from salnet.data.plan import device_augment_seed
from salnet.model import build_model
from salnet.run.checkpoint import load_best
from salnet.run.rundir import RunDir
from salnet.shards.synth import synthesize
from salnet.validate import probabilities_at

from conftest import REPO, corrupt_last_val_image, forked_run, ranks, run_py

pytestmark = pytest.mark.slow  # every test here starts training runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train, val = synthesize(root / "demo", train=64, val=20, size=64, seed=3)
    return {"train": train, "val": val, "root": root}


def tiny_config(tmp_path, shards, **sections):
    cfg = {
        "name": "tiny",
        "out_dir": str(tmp_path / "runs"),
        "data": {
            "train": [str(shards["train"])],
            "val": [str(shards["val"])],
            "size": 64,
            "eval_size": 64,
            "batch_size": 8,
            "eval_batch_size": 8,
            "workers": 0,
        },
        "model": {"backbone": {"name": "resnet18"}, "ppm_width": 32, "fpn_width": 32},
        "optim": {"lr": 1e-3, "backbone_lr_mult": 1.0, "warmup_steps": 2},
        "train": {"steps": 6},
        "eval": {"every": 3},
        "checkpoint": {"every": 3, "keep": 5},
        # runs/NAME/plots/ only where a test reads them (test_report, test_dashboards): drawing them
        # at every validation costs a run like this more CPU than its training does
        "log": {"every": 2, "plots": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values) if isinstance(values, dict) else cfg.__setitem__(section, values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "runs" / cfg["name"]


def records(run_dir, kind):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def assert_metrics_are_those_of_best_pt(run_dir, best):
    """The logged metrics equal PySODMetrics on best.pt's predictions over the same val set,
    computed here in one process (so sharded validation lost or repeated nothing)."""
    from py_sod_metrics import MAE, Emeasure, Fmeasure, Smeasure

    from salnet.data import to_model_input

    torch.set_num_threads(1)  # the run used one thread per rank: same kernels, same floats
    cfg = load_config(str(run_dir / "config.yaml"))
    model = build_model(cfg.model)
    model.load_state_dict(best["model"])
    model.eval().to(memory_format=torch.channels_last)
    refs = {"F": Fmeasure(), "E": Emeasure(), "S": Smeasure(), "MAE": MAE()}
    for batch in ValStream(cfg.data, rank=0, world_size=1):
        images = to_model_input(batch["image"], torch.device("cpu"), channels_last=True)
        with torch.no_grad():
            preds = probabilities_at(model(images), [tuple(m.shape) for m in batch["masks"]])
        for pred, mask in zip(preds, batch["masks"]):
            pred_png = (pred.numpy() * 255).astype(np.uint8)  # as a saved 8-bit prediction map
            for ref in refs.values():
                ref.step(pred=pred_png, gt=mask.numpy())
    f, e = refs["F"].get_results(), refs["E"].get_results()
    expected = {
        "maxF": f["fm"]["curve"].max(),
        "meanF": f["fm"]["curve"].mean(),
        "adpF": f["fm"]["adp"],
        "maxE": e["em"]["curve"].max(),
        "meanE": e["em"]["curve"].mean(),
        "adpE": e["em"]["adp"],
        "S": refs["S"].get_results()["sm"],
        "MAE": refs["MAE"].get_results()["mae"],
    }
    for name, value in expected.items():
        assert best["metrics"][f"val/{name}"] == pytest.approx(value, abs=1e-6), name


def test_one_process_trains_validates_and_keeps_best(tmp_path, shards):
    path, run_dir = tiny_config(tmp_path, shards, log={"every": 2, "wandb": True})
    secret = "0123456789abcdef-not-a-real-wandb-key"
    proc = run_py(
        ["-m", "salnet.train", "--config", path],
        timeout=300,
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": secret, "WANDB_SILENT": "true"},
    )
    out = proc.stdout
    assert secret not in out + proc.stderr
    assert "global batch 8 = 1 ranks x 8 micro-batch x 1 accumulation" in out
    # W&B (real wandb, offline): one run, whose id the checkpoint keeps for a requeued job.
    wandb_id = torch.load(run_dir / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)["client"]["train"][
        "wandb_id"
    ]
    assert [p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")] == [wandb_id]
    assert load_config(str(run_dir / "config.yaml")) == load_config(str(path))
    vals = records(run_dir, "val")
    assert [v["step"] for v in vals] == [3, 6] and all(v["val/images"] == 20 for v in vals)
    assert [r["step"] for r in records(run_dir, "train")] == [2, 4, 6]
    best = load_best(RunDir(run_dir).best)
    best_val = max(vals, key=lambda v: v["val/maxF"])
    assert best["step"] == best_val["step"] and best["metrics"]["val/maxF"] == best_val["val/maxF"]
    assert all(v.dtype == torch.float32 for v in best["model"].values() if v.is_floating_point())
    assert [p.name for p in RunDir(run_dir).complete_checkpoints()] == ["step-00000003", "step-00000006"]

    assert_metrics_are_those_of_best_pt(run_dir, best)


def test_ddp_two_ranks_resume_is_bitwise_identical(tmp_path, shards):
    # With the augmentation on the device (data.augment_on=device), whose per-rank generator must
    # come back from the checkpoint too. (augment_on=worker, the CPU default, draws from seeds of the
    # plan: the resume tests of test_train_stop and test_slurm run it.)
    path, run_dir = tiny_config(tmp_path, shards, data={"augment_on": "device"})
    out = ranks(2, ["-m", "salnet.train", "--config", path], timeout=300).stdout
    assert "global batch 16 = 2 ranks x 8 micro-batch x 1 accumulation" in out
    assert out.count("validation @ step") == 2  # rank 0 only
    # Every rank validated its share with rank 0's BatchNorm statistics: the all-reduced metrics
    # are exactly those of best.pt evaluated in one process.
    assert_metrics_are_those_of_best_pt(run_dir, load_best(RunDir(run_dir).best))
    uninterrupted = torch.load(run_dir / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)

    # Stop after step 3: drop everything the run did after its step-3 checkpoint, then resume.
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")
    out = ranks(2, ["-m", "salnet.train", "--config", path], timeout=300).stdout
    assert "resumed from" in out and "step-00000003 at step 3" in out
    resumed = torch.load(run_dir / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    for key, value in uninterrupted["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(uninterrupted["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert uninterrupted["client"]["train"] == resumed["client"]["train"]
    for a, b in zip(uninterrupted["client"]["rng"], resumed["client"]["rng"]):  # every rank's RNG streams
        assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"]
    inputs = uninterrupted["client"]["inputs"]  # the device-side augmentation: one generator per rank ...
    assert len(inputs) == 2 and not torch.equal(inputs[0]["generator"], inputs[1]["generator"])
    for rank, state in enumerate(inputs):  # ... that has drawn (the device augmented) ...
        assert not torch.equal(
            state["generator"], torch.Generator().manual_seed(device_augment_seed(0, rank)).get_state()
        )
    for a, b in zip(inputs, resumed["client"]["inputs"]):  # ... and resumed exactly
        assert torch.equal(a["generator"], b["generator"])
    # metrics.jsonl reads as one run: the interrupted run's lines after step 3 were replaced.
    steps = [(r["kind"], r["step"]) for r in records(run_dir, "train") + records(run_dir, "val")]
    assert len(steps) == len(set(steps)) and ("val", 6) in steps


def test_a_rank_that_raises_ends_the_job(tmp_path, shards):
    # Corrupt the last val sample's image: only the rank that holds it fails, during validation,
    # while the other rank waits in the metrics all-reduce.
    val = tmp_path / "val"
    key = corrupt_last_val_image(shards["val"], val)
    path, _ = tiny_config(tmp_path, shards, data={"val": [str(val)]}, train={"steps": 3, "timeout_s": 60})
    proc = ranks(2, ["-m", "salnet.train", "--config", path], check=False, timeout=170)
    assert proc.returncode != 0
    assert "[rank 1]" in proc.stderr and key in proc.stderr


def test_short_demo_learns(tmp_path, shards):
    root = tmp_path / "demo"
    train, val = synthesize(root, train=256, val=32, size=64, seed=11)
    path, run_dir = tiny_config(
        tmp_path,
        {"train": train, "val": val},
        data={"batch_size": 16},
        train={"steps": 40},
        eval={"every": 10},
        checkpoint={"every": 40},
        log={"every": 20},
        optim={"warmup_steps": 10},
    )
    forked_run(["-m", "salnet.train", "--config", path], timeout=600)
    vals = records(run_dir, "val")
    first, last = vals[0], vals[-1]  # at steps 10 and 40 (measured: maxF 0.31 -> 0.61, MAE 0.52 -> 0.27)
    assert last["val/maxF"] > first["val/maxF"] + 0.2, vals
    assert last["val/MAE"] < first["val/MAE"], vals


def test_diverging_run_stops_after_max_bad_steps_keeping_the_last_good_checkpoint(tmp_path, shards):
    # lr=1e12: AdamW moves every weight by ~1e12 in one step; from then on the loss is non-finite,
    # every step is skipped on all ranks together, and the run stops after max_bad_steps of them.
    path, run_dir = tiny_config(
        tmp_path,
        shards,
        optim={"lr": 1e12, "warmup_steps": 0},
        train={"steps": 8, "max_bad_steps": 3},
        checkpoint={"every": 1, "keep": 10},
        eval={"every": 100},
    )
    proc = forked_run(["-m", "salnet.train", "--config", path], timeout=300, check=False)
    assert proc.returncode == 1
    assert "TrainingDiverged: 3 consecutive steps skipped (non-finite loss)" in proc.stderr
    assert "[rank 0]" in proc.stderr
    assert proc.stdout.count("skipped (non-finite loss)") == 3
    newest = RunDir(run_dir).complete_checkpoints()[-1]
    stopped_at = int(proc.stderr.split(" at step ")[1].split()[0])
    # The checkpoints end before the streak: nothing written during the bad steps.
    assert int(newest.name.split("-")[1]) == stopped_at - 3


def test_named_val_sets_are_scored_separately_each_sample_once_for_1_2_3_ranks(tmp_path, shards):
    other = synthesize(tmp_path / "other", train=1, val=13, size=48, seed=9)[1]
    path, _ = tiny_config(
        tmp_path, shards, data={"val": {"A": [str(shards["val"])], "B": [str(other)]}}, eval={"best_metric": "B/MAE"}
    )
    probe = REPO / "tests" / "val_sets_probe.py"
    results = []
    for world in (1, 2, 3):
        out = tmp_path / f"scores{world}.json"
        if world == 1:
            forked_run([probe, path, out], timeout=200)
        else:
            ranks(world, [probe, path, out], timeout=300)
        results.append(json.loads(out.read_text()))
    for scores in results:
        assert scores["A/images"] == 20 and scores["B/images"] == 13  # every sample of each set, once
        assert scores["mean/maxF"] == pytest.approx((scores["A/maxF"] + scores["B/maxF"]) / 2)
        assert scores["A/MAE"] != scores["B/MAE"]
    for scores in results[1:]:  # sharding over ranks changes nothing
        for key, value in results[0].items():
            assert scores[key] == pytest.approx(value, abs=1e-9), key


def test_training_with_named_val_sets_keeps_the_best_of_the_named_metric(tmp_path, shards):
    other = synthesize(tmp_path / "other", train=1, val=8, size=48, seed=9)[1]
    path, run_dir = tiny_config(
        tmp_path,
        shards,
        data={"val": {"A": [str(shards["val"])], "B": [str(other)]}},
        eval={"best_metric": "B/MAE", "every": 2},
        train={"steps": 4},
        checkpoint={"every": 4},
    )
    out = forked_run(["-m", "salnet.train", "--config", path], timeout=300).stdout
    table = out[out.rindex("validation @ step 4") :].splitlines()
    assert table[1].split()[:3] == ["set", "maxF", "meanF"]
    assert [row.split()[0] for row in table[2:5]] == ["A", "B", "mean"]
    vals = records(run_dir, "val")
    assert [v["step"] for v in vals] == [2, 4] and all(v["A/images"] == 20 and v["B/images"] == 8 for v in vals)
    best_val = min(vals, key=lambda v: v["B/MAE"])  # MAE: lower is better
    best = load_best(RunDir(run_dir).best)
    assert best["step"] == best_val["step"]
    assert best["metrics"] == {k: v for k, v in best_val.items() if k not in ("kind", "step")}
    assert f"best B/MAE={best_val['B/MAE']:.4f} @ step {best_val['step']}" in out


def test_resume_applies_changed_learning_rates_and_refuses_changes_that_make_another_run(tmp_path, shards):
    path, run_dir = tiny_config(
        tmp_path,
        shards,
        train={"steps": 4},
        eval={"every": 4},
        checkpoint={"every": 2, "keep": 5},
        log={"every": 1},
        optim={"warmup_steps": 0, "schedule": "constant"},
    )
    forked_run(["-m", "salnet.train", "--config", path], timeout=300)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")  # as if it had stopped after step 2
    refused = forked_run(
        ["-m", "salnet.train", "--config", path, "model.fpn_width=16", "train.seed=7"], timeout=300, check=False
    )
    assert refused.returncode == 1
    assert (
        "cannot resume" in refused.stderr
        and "model.fpn_width: 32 -> 16" in refused.stderr
        and "train.seed: 0 -> 7" in refused.stderr
    )
    assert "start a new run instead" in refused.stderr
    out = forked_run(["-m", "salnet.train", "--config", path, "optim.lr=0.005", "log.every=2"], timeout=300).stdout
    assert (
        "changed settings that take effect" in out and "optim.lr: 0.001 -> 0.005" in out and "log.every: 1 -> 2" in out
    )
    lrs = {r["step"]: r["lr"] for r in records(run_dir, "train")}
    assert lrs[1] == lrs[2] == pytest.approx(1e-3) and lrs[4] == pytest.approx(5e-3)  # the new lr, for real
    assert json.loads((run_dir / "checkpoints" / "step-00000004" / "config.json").read_text())["optim"]["lr"] == 0.005


def test_non_finite_predictions_at_validation_are_reported_as_divergence_on_every_rank(tmp_path, shards):
    # lr=1e12: after one step the network predicts NaN; validation comes before max_bad_steps runs out.
    path, run_dir = tiny_config(
        tmp_path,
        shards,
        optim={"lr": 1e12, "warmup_steps": 0},
        train={"steps": 8, "max_bad_steps": 10, "timeout_s": 60},
        eval={"every": 2},
        checkpoint={"every": 100},
    )
    proc = ranks(2, ["-m", "salnet.train", "--config", path], check=False, timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] TrainingDiverged: validation at step 2:" in proc.stderr, proc.stderr[-3000:]
    assert "non-finite predictions" in proc.stderr and "ValueError" not in proc.stderr
