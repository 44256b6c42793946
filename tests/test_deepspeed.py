"""DeepSpeed ZeRO end to end: real DeepSpeed, two real ranks on gloo on CPU (resnet18, 64 px)."""

import json
import shutil
import stat

import pytest
import torch
from test_train import records, tiny_config

from salnet.config import Config, ConfigError, load_config
from salnet.data import ValStream
from salnet.metrics import SODMetrics
from salnet.model import build_model
from salnet.run.checkpoint import load_best
from salnet.run.rundir import RunDir
from salnet.shards.synth import synthesize
from salnet.strategy.base import predict_logits
from salnet.strategy.zero_config import deepspeed_config
from salnet.validate import validate

from conftest import REPO, forked_run, ranks

PROBE = REPO / "tests" / "zero_probe.py"
ZERO = {"strategy": "deepspeed", "timeout_s": 60}  # a hang fails within a minute, not the default half hour
# The probe compares strategies in one memory layout: DDP's parameters can be channels_last,
# DeepSpeed's never are (it flattens them into partitions), and convolutions pick their kernels by it.
SAME_LAYOUT = "train.channels_last=false"
SGD_ACCUM_CLIP = "optim.name=sgd,optim.lr=0.05,optim.weight_decay=5e-4,optim.grad_clip=1.0,train.grad_accum=2"
PROBE_CASES = {
    "ddp": "",
    "zero1": "train.strategy=deepspeed,train.zero_stage=1",
    "zero2": "train.strategy=deepspeed,train.zero_stage=2",
    "zero3_offload": "train.strategy=deepspeed,train.zero_stage=3,train.offload_optimizer=true,train.offload_params=true",
    "ddp_sgd": SGD_ACCUM_CLIP,
    "zero2_sgd": f"train.strategy=deepspeed,{SGD_ACCUM_CLIP}",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 21 val samples on 2 ranks with eval_batch_size=5: rank 0 holds 10 (2 batches), rank 1 holds 11 (3).
    train, val = synthesize(tmp_path_factory.mktemp("shards"), train=64, val=21, size=64, seed=3)
    return {"train": train, "val": val}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    cases = [f"{name}:{SAME_LAYOUT},{overrides}".rstrip(",") for name, overrides in PROBE_CASES.items()]
    ranks(2, [PROBE, out, 3, *cases], timeout=300)
    return {
        name: (load_best(RunDir(out / name).best), torch.load(out / name / "engine.pt", weights_only=True))
        for name in PROBE_CASES
    }


def plain_model(best: dict) -> torch.nn.Module:
    model = build_model(Config.model_validate(best["config"]).model)
    model.load_state_dict(best["model"])  # strict: every key and shape of the plain network
    return model.eval()


def single_process_scores(run_dir, best: dict, amp_dtype=None) -> dict:
    """best.pt evaluated by one process, without DeepSpeed, over the whole val set, in the memory
    layout the run validated in (train.channels_last: on some CPUs a depthwise convolution's floats
    differ between the layouts, a map level flips and maxF moves in the 5th digit)."""
    cfg = load_config(str(run_dir / "config.yaml"))
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = plain_model(best).to(memory_format=layout)
    return validate(
        lambda images: predict_logits(model, images, amp_dtype, channels_last=cfg.train.channels_last),
        ValStream(cfg.data, rank=0, world_size=1),
        SODMetrics(cfg.eval.metrics),
    )


def assert_best_is_what_validation_saw(run_dir, amp_dtype=None):
    torch.set_num_threads(1)  # the run used one thread per rank: same kernels, same floats
    best = load_best(RunDir(run_dir).best)
    assert all(v.dtype == torch.float32 for v in best["model"].values() if v.is_floating_point())
    logged = next(r for r in records(run_dir, "val") if r["step"] == best["step"])
    assert best["metrics"] == {k: logged[k] for k in best["metrics"]}
    expected = single_process_scores(run_dir, best, amp_dtype)
    for name, value in expected.items():
        assert best["metrics"][f"val/{name}"] == pytest.approx(value, abs=1e-6), name
    return best


@pytest.mark.slow
def test_best_pt_of_every_zero_stage_predicts_what_the_engine_predicts(probe):
    torch.set_num_threads(1)
    for name in ("zero1", "zero2", "zero3_offload", "zero2_sgd"):
        best, engine = probe[name]
        with torch.no_grad():
            predictions = plain_model(best)(engine["images"])
        assert torch.equal(predictions, engine["predictions"]), name


@pytest.mark.slow
def test_zero_tracks_ddp_from_the_same_seed(probe):
    # AdamW, no accumulation or clipping: bitwise. The gradient average of two ranks is one
    # rounding either way, AdamW's update is elementwise, lr groups and schedule are shared.
    ddp_best, ddp_engine = probe["ddp"]
    for name in ("zero1", "zero2", "zero3_offload"):
        best, engine = probe[name]
        assert engine["losses"] == ddp_engine["losses"], name
        assert all(torch.equal(best["model"][k], ddp_best["model"][k]) for k in ddp_best["model"]), name
    # SGD with accumulation and clipping: ZeRO reduces every micro-batch and sums the averages,
    # (a1+b1)/2 + (a2+b2)/2, where DDP reduces the local sums once, ((a1+a2)+(b1+b2))/2; and it
    # takes the clipping norm over partitions in float64. Both differ by float32 roundings, a few
    # 1e-6 after three steps (measured 3e-6), far below what a wrong lr group or schedule moves a
    # weight (lr 0.05 x gradient: 1e-3 and more).
    ddp_best, ddp_engine = probe["ddp_sgd"]
    best, engine = probe["zero2_sgd"]
    assert engine["losses"] == pytest.approx(ddp_engine["losses"], rel=1e-5)
    for key, value in ddp_best["model"].items():
        torch.testing.assert_close(best["model"][key], value, rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")  # noqa: B023 (called at once)
    moved = max((ddp_best["model"][k] - probe["ddp"][0]["model"][k]).abs().max().item() for k in ddp_best["model"])
    assert moved > 1e-3  # SGD and AdamW runs differ: the comparison above can fail


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_all(probe):
    # Rank 1's loss is +inf with finite gradients: ZeRO's own check (a non-finite gradient norm)
    # would not see it; the strategy makes it.
    for name in ("zero1", "zero2", "zero3_offload", "zero2_sgd"):
        bad_step = probe[name][1]["bad_step"]
        assert bad_step == {"skipped": ["non-finite loss", "non-finite loss"], "parameters_unchanged": True}, name


@pytest.mark.slow
def test_zero2_trains_validates_and_resumes_bitwise(tmp_path, shards):
    from salnet.strategy.zero import TAG, WeightsOnlyCheckpointEngine  # imports DeepSpeed

    path, run_dir = tiny_config(tmp_path, shards, train={**ZERO, "zero_stage": 2}, data={"eval_batch_size": 5})
    out = ranks(2, ["-m", "salnet.train", "--config", path], timeout=300).stdout
    assert "global batch 16 = 2 ranks x 8 micro-batch x 1 accumulation" in out
    assert [v["step"] for v in records(run_dir, "val")] == [3, 6] and all(
        v["val/images"] == 21 for v in records(run_dir, "val")
    )
    assert_best_is_what_validation_saw(run_dir)
    cfg = load_config(str(path))
    assert json.loads((run_dir / "deepspeed_config.json").read_text()) == deepspeed_config(cfg, world_size=2)
    # DeepSpeed wrote only inside the directories it was handed: the temp-dir rename covers all of it.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]

    def state(checkpoint):
        files = sorted((checkpoint / TAG).glob("*.pt"))
        assert len(files) == 3  # model states + the optimizer partition of each rank
        return {f.name: WeightsOnlyCheckpointEngine().load(str(f)) for f in files}, torch.load(
            checkpoint / "salnet_state.pt", weights_only=True
        )

    uninterrupted = state(run_dir / "checkpoints" / "step-00000006")
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")
    out = ranks(2, ["-m", "salnet.train", "--config", path], timeout=300).stdout
    assert "step-00000003 at step 3" in out
    resumed = state(run_dir / "checkpoints" / "step-00000006")
    # Everything, RNG snapshots of every rank included (the loader draws nothing from torch's
    # global generator, so a resumed run is not one draw behind).
    assert_equal_trees(uninterrupted, resumed)

    # ZeRO partitions belong to a world size: one plain process (DeepSpeed on a one-rank group)
    # refuses them, naming both sizes.
    proc = forked_run(["-m", "salnet.train", "--config", path], timeout=120, check=False)
    assert proc.returncode == 1
    assert "holds the ZeRO partitions of a 2-rank run; DeepSpeed cannot load them into 1 rank(s)" in proc.stderr


def assert_equal_trees(a, b, where="") -> None:
    """Same structure, bitwise-equal tensors, equal everything else (DeepSpeed's config, versions...)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_trees(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_trees(x, y, f"{where}/{i}")
    elif hasattr(a, "__dict__"):  # DeepSpeed's loss scaler
        assert_equal_trees(vars(a), vars(b), where)
    else:
        assert a == b, where


@pytest.mark.slow
def test_zero3_with_uneven_val_shares_finishes_and_matches_one_process(tmp_path, shards):
    path, run_dir = tiny_config(
        tmp_path,
        shards,
        train={**ZERO, "zero_stage": 3, "steps": 4},
        eval={"every": 4},
        checkpoint={"every": 4},
        data={"eval_batch_size": 5},
    )
    cfg = load_config(str(path))
    shares = [ValStream(cfg.data, rank=r, world_size=2) for r in range(2)]
    assert [s.samples for s in shares] == [10, 11] and [len(s) for s in shares] == [2, 3]  # the premise: uneven
    ranks(2, ["-m", "salnet.train", "--config", path], timeout=300)
    best = assert_best_is_what_validation_saw(run_dir)
    # The documented converter merges the final checkpoint's ZeRO-3 partitions into best.pt's
    # format; best.pt was taken at the same (last) step, so the two agree bitwise.
    checkpoint = RunDir(run_dir).complete_checkpoints()[-1]
    forked_run(["-m", "salnet.strategy.convert", checkpoint, tmp_path / "exported"], timeout=120)
    exported = load_best(RunDir(tmp_path / "exported").best)
    assert best["step"] == exported["step"] == 4 and exported["config"] == best["config"]
    assert list(exported["model"]) == list(best["model"])
    assert all(torch.equal(exported["model"][k], v) for k, v in best["model"].items())


@pytest.mark.slow
def test_zero1_bf16_trains_validates_and_keeps_best(tmp_path, shards):
    path, run_dir = tiny_config(
        tmp_path,
        shards,
        train={**ZERO, "zero_stage": 1, "steps": 3, "amp": "bf16"},
        eval={"every": 3},
        checkpoint={"every": 3},
    )
    ranks(2, ["-m", "salnet.train", "--config", path], timeout=300)
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
    }
    assert_best_is_what_validation_saw(run_dir, amp_dtype=torch.bfloat16)
    # Every file follows the ranks' umask (config.yaml shows it), DeepSpeed's recovery scripts too.
    mode = stat.S_IMODE((run_dir / "config.yaml").stat().st_mode)
    files = {p: stat.S_IMODE(p.stat().st_mode) for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    scripts = [p for p in files if p.suffix == ".py"]
    assert scripts and all(files[p] == mode | (mode & 0o444) >> 2 for p in scripts), {
        p.name: oct(files[p]) for p in scripts
    }
    assert all(m == mode for p, m in files.items() if p not in scripts), {p.name: oct(m) for p, m in files.items()}


def zero_config(*overrides):
    return load_config(None, ["train.strategy=deepspeed", "data.batch_size=8", "train.grad_accum=2", *overrides])


def test_pass_through_merges_and_conflicts_name_both_keys():
    ds = deepspeed_config(
        zero_config(
            "deepspeed.zero_optimization.overlap_comm=true",
            "deepspeed.optimizer.params.eps=1e-6",
            "deepspeed.train_micro_batch_size_per_gpu=8",
            "deepspeed.optimizer.params.lr=1e-4",
        ),
        world_size=4,
    )
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 25 * 2**18,
        "allgather_bucket_size": 25 * 2**18,
        "overlap_comm": True,
        "offload_optimizer": {"device": "none"},
        "offload_param": {"device": "none"},
        "memory_efficient_linear": False,  # salnet's default: DDP's Linear numerics (zero_config says why)
    }
    chosen = deepspeed_config(zero_config("deepspeed.zero_optimization.memory_efficient_linear=true"), world_size=4)
    assert chosen["zero_optimization"]["memory_efficient_linear"] is True  # a default, not a derived key
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-4, "weight_decay": 1e-4, "betas": [0.9, 0.999], "torch_adam": True, "eps": 1e-6},
    }
    with pytest.raises(ConfigError) as e:
        deepspeed_config(
            zero_config(
                "deepspeed.train_batch_size=32",
                "deepspeed.scheduler.type=WarmupLR",
                "deepspeed.zero_optimization.stage=3",
            ),
            world_size=4,
        )
    message = str(e.value)
    assert "deepspeed.train_batch_size=32 contradicts 4 ranks x data.batch_size=8 x train.grad_accum=2" in message
    assert "deepspeed.zero_optimization.stage=3 contradicts train.zero_stage=2" in message
    assert "deepspeed.scheduler is set, but salnet steps its own lr schedule (optim.schedule" in message


def test_the_zero2_recipe_generates_the_duts_schedule_for_8_ranks():
    ds = deepspeed_config(load_config(str(REPO / "configs" / "duts_r50_zero2.yaml")), world_size=8)
    assert (
        ds["train_batch_size"] == 32
        and ds["zero_optimization"]["stage"] == 2
        and ds["zero_optimization"]["overlap_comm"] is True
    )
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and ds["gradient_clipping"] == 5.0
    assert ds["optimizer"] == {
        "type": "SGD",
        "params": {"lr": 0.05, "weight_decay": 5e-4, "momentum": 0.9, "nesterov": True},
    }
    assert ds["zero_allow_untested_optimizer"] is True


def test_deepspeed_options_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="train.offload_params=true needs train.zero_stage=3"):
        zero_config("train.offload_params=true")
    with pytest.raises(ConfigError, match="train.offload_optimizer / train.offload_params are DeepSpeed options"):
        load_config(None, ["train.offload_optimizer=true"])
    with pytest.raises(ConfigError, match=r"the deepspeed: section \(bf16\) applies only to train.strategy=deepspeed"):
        load_config(None, ["deepspeed.bf16.enabled=true"])
