import math

import pytest
import torch

from salnet.config import load_config
from salnet.optim import build_optimizer, lr_factor, param_groups
from salnet.run.checkpoint import ClientState, load_checkpoint, resume_path, save_checkpoint
from salnet.run.rundir import RunDir
from salnet.run.state import TrainState
from salnet.strategy import SkipReason, build_strategy

from conftest import REPO, forked_run, ranks
from strategy_probe import TinyNet, bce

PROBE = REPO / "tests" / "strategy_probe.py"
SGD = ["optim.name=sgd", "optim.lr=0.1", "optim.weight_decay=0.01", "optim.backbone_lr_mult=0.5"]


def weights(path):
    return torch.load(path, weights_only=True)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")  # noqa: B023 (called at once)


@pytest.mark.slow
def test_ddp_two_ranks_matches_one_process_with_the_same_global_batch(tmp_path):
    forked_run([PROBE, tmp_path / "one.pt", 8, 3, *SGD])
    ranks(2, [PROBE, tmp_path / "two.pt", 8, 3, *SGD])
    one, two = weights(tmp_path / "one.pt"), weights(tmp_path / "two.pt")
    assert_close(one, two)  # gradients are averaged, not summed: same update as one process
    # ... and the steps really moved the weights, so the comparison can fail
    torch.manual_seed(0)
    initial = TinyNet().state_dict()
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 1e-3


@pytest.mark.slow
def test_accumulation_2x4_matches_1x8(tmp_path):
    forked_run([PROBE, tmp_path / "1x8.pt", 8, 3, *SGD])
    forked_run([PROBE, tmp_path / "2x4.pt", 8, 3, *SGD, "train.grad_accum=2"])
    ranks(2, [PROBE, tmp_path / "ddp2x2.pt", 8, 3, *SGD, "train.grad_accum=2"])
    assert_close(weights(tmp_path / "1x8.pt"), weights(tmp_path / "2x4.pt"))
    assert_close(weights(tmp_path / "1x8.pt"), weights(tmp_path / "ddp2x2.pt"))


def test_param_groups_backbone_multiplier_and_no_decay_on_norm_and_bias():
    cfg = load_config(None, SGD).optim
    groups = {g["name"]: g for g in param_groups(TinyNet(), cfg)}
    assert set(groups) == {"backbone/decay", "backbone/no_decay", "decoder/decay", "decoder/no_decay"}
    assert groups["backbone/decay"]["lr"] == pytest.approx(0.05) and groups["decoder/decay"]["lr"] == pytest.approx(0.1)
    assert groups["decoder/no_decay"]["weight_decay"] == 0 and groups["backbone/decay"]["weight_decay"] == 0.01
    assert all(p.ndim < 2 for p in groups["backbone/no_decay"]["params"])  # GroupNorm weight/bias, conv bias
    opt = build_optimizer(TinyNet(), load_config(None, ["optim.name=sgd"]).optim)
    assert opt.defaults["nesterov"] is True


@pytest.mark.parametrize("schedule", ["cosine", "poly", "constant"])
def test_lr_schedule_warmup_then_decay(schedule):
    cfg = load_config(None, [f"optim.schedule={schedule}", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]).optim
    f = [lr_factor(s, 110, cfg) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up, never 0
    assert f[10] == pytest.approx(1.0)
    if schedule == "constant":
        assert f[-1] == 1.0
    else:
        assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay
        assert lr_factor(110, 110, cfg) == pytest.approx(0.1)  # ends at min_lr_ratio
    if schedule == "cosine":
        assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: half of the range


def test_nonfinite_loss_is_skipped_and_weights_untouched():
    cfg = load_config(None, ["train.channels_last=false", "optim.lr=0.1"])
    model = TinyNet()
    strategy = build_strategy(cfg, model, total_steps=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(2, 3, 8, 8), torch.ones(2, 1, 8, 8)

    def nan_loss(out, tgt):
        return out.float().mean() * math.nan, {}

    strategy.forward_backward(x, y, nan_loss, sync=True)
    assert strategy.optimizer_step().skipped is SkipReason.NON_FINITE_LOSS
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    strategy.forward_backward(x, y, bce, sync=True)
    assert strategy.optimizer_step().skipped is None
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def client(step):
    return ClientState(train=TrainState(step=step), world_size=1, loader=[{"batches": step}], rng=[{}])


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path):
    cfg = load_config(None, ["train.channels_last=false"])
    strategy = build_strategy(cfg, TinyNet(), total_steps=10)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, strategy, client(step), keep=2)
    assert [p.name for p in RunDir(tmp_path).complete_checkpoints()] == ["step-00000004", "step-00000006"]
    # An interrupted save leaves only a hidden temporary directory: never picked for resume.
    debris = tmp_path / "checkpoints" / ".step-00000008.tmp"
    debris.mkdir()
    (debris / "state.pt").write_bytes(b"half a checkpoint")
    assert resume_path(tmp_path, "auto").name == "step-00000006"
    assert load_checkpoint(resume_path(tmp_path, "auto"), strategy) == client(6)
    # ... and the next save of that step cleans the debris up.
    save_checkpoint(tmp_path, 8, strategy, client(8), keep=2)
    assert not debris.exists() and resume_path(tmp_path, "auto").name == "step-00000008"
    assert resume_path(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="train.resume='nope'.*valid values"):
        resume_path(tmp_path, "nope")
    # train.resume=none starts over: the earlier run's checkpoints and best.pt go.
    run = RunDir(tmp_path)
    run.best.write_bytes(b"old best")
    assert sorted(run.start_over()) == [run.best, run.checkpoints]
    assert resume_path(tmp_path, "auto") is None and not run.best.exists()
