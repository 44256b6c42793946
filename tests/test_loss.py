"""salnet.loss: hand-computed values, per-image averaging, deep supervision, float32 under autocast."""

import math

import pytest
import torch

from salnet.config import ConfigError, LossConfig, load_config
from salnet.loss import build_loss, check_side_weights

DIAGONAL = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)


def fused_only(kind):
    """The pixel loss alone: one output, so no side weights apply."""
    return build_loss(LossConfig(kind=kind))


def test_uniform_half_probability_on_a_diagonal_mask():
    # p = 0.5 everywhere; T = two of four pixels.
    # BCE = ln 2; |P∩T| = 1, |P|+|T| = 4: IoU loss = 1 - (1+1)/(4-1+1) = 0.5, Dice loss = 1 - (2+1)/(4+1) = 0.4
    logits = torch.zeros(1, 1, 2, 2)
    total, parts = fused_only("bce_iou")(logits, DIAGONAL)
    assert parts["fused_bce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert parts["fused_iou"].item() == pytest.approx(0.5, abs=1e-6)
    assert total.item() == pytest.approx(math.log(2) + 0.5, abs=1e-6)
    total, parts = fused_only("dice")(logits, DIAGONAL)
    assert parts["fused_dice"].item() == pytest.approx(0.4, abs=1e-6)
    assert total.item() == pytest.approx(math.log(2) + 0.4, abs=1e-6)


def test_structure_loss_weights_by_the_31x31_local_mean():
    # The 31x31 window (zero padding counted) covers the whole 2x2 map: local mean = 2/961 everywhere.
    # Weights: w1 = 1 + 5(1 - 2/961) on the mask, w0 = 1 + 5(2/961) off it. With p = 0.5 the weighted
    # BCE is still ln 2; weighted IoU: inter = 0.5 * 2w1, sum(P+T) = 1.5 * 2w1 + 0.5 * 2w0.
    w1, w0 = 1 + 5 * (1 - 2 / 961), 1 + 5 * (2 / 961)
    inter, both = w1, 3 * w1 + w0
    _, parts = fused_only("structure")(torch.zeros(1, 1, 2, 2), DIAGONAL)
    assert parts["fused_wbce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert parts["fused_wiou"].item() == pytest.approx(1 - (inter + 1) / (both - inter + 1), abs=1e-6)


def test_non_uniform_prediction():
    # p = [[.75, .5], [.5, .25]] against T = [[1, 0], [0, 0]].
    logits = torch.tensor([[math.log(3), 0.0], [0.0, -math.log(3)]]).view(1, 1, 2, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    bce = (-math.log(0.75) * 2 + math.log(2) * 2) / 4
    inter, both = 0.75, 2.0 + 1.0
    _, parts = fused_only("bce_iou")(logits, target)
    assert parts["fused_bce"].item() == pytest.approx(bce, abs=1e-6)
    assert parts["fused_iou"].item() == pytest.approx(1 - (inter + 1) / (both - inter + 1), abs=1e-6)
    _, parts = fused_only("dice")(logits, target)
    assert parts["fused_dice"].item() == pytest.approx(1 - (2 * inter + 1) / (both + 1), abs=1e-6)


@pytest.mark.parametrize("kind", ["bce_iou", "structure", "dice"])
def test_batch_loss_is_the_mean_of_per_image_losses(kind):
    # IoU and Dice are ratios per image: pooling the sums over the batch would give another value.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 9, 7, generator=g)
    target = torch.zeros(2, 1, 9, 7)
    target[0, :, 2:5, 1:3] = 1
    target[1, :, 1:8, :] = 1
    loss = fused_only(kind)
    batch, _ = loss(logits, target)
    singles = [loss(logits[i : i + 1], target[i : i + 1])[0] for i in range(2)]
    assert batch.item() == pytest.approx((singles[0].item() + singles[1].item()) / 2, abs=1e-6)


def test_structure_loss_charges_boundary_errors_more():
    target = torch.zeros(1, 1, 64, 64)
    target[..., 24:40, 24:40] = 1
    perfect = (target * 2 - 1) * 8
    loss = fused_only("structure")

    def wbce_with_wrong_pixel(y, x):
        logits = perfect.clone()
        logits[..., y, x] = -logits[..., y, x]
        return loss(logits, target)[1]["fused_wbce"].item()

    base = loss(perfect, target)[1]["fused_wbce"].item()
    # (23, 32) lies just outside the square: its 31x31 window holds 15 x 16 mask pixels, weight
    # 1 + 5 * 240/961; the far corner (0, 0) sees none, weight 1. The error costs in that ratio.
    ratio = (wbce_with_wrong_pixel(23, 32) - base) / (wbce_with_wrong_pixel(0, 0) - base)
    assert ratio == pytest.approx(1 + 5 * 240 / 961, rel=1e-3)


def test_deep_supervision_weights_and_component_names():
    weights = [0.5, 0.25, 0.125, 0.0625]
    loss = build_loss(LossConfig(kind="bce_iou", side_weights=weights))
    g = torch.Generator().manual_seed(1)
    outputs = [torch.randn(2, 1, 8, 8, generator=g) for _ in range(5)]
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    total, parts = loss(outputs, target)
    assert set(parts) == {"fused", "fused_bce", "fused_iou", "side2", "side3", "side4", "side5"}
    alone = [loss(o, target)[0].item() for o in outputs]
    assert parts["fused"].item() == pytest.approx(alone[0], abs=1e-6)
    assert [parts[f"side{i}"].item() for i in range(2, 6)] == pytest.approx(alone[1:], abs=1e-6)
    assert total.item() == pytest.approx(alone[0] + sum(w * a for w, a in zip(weights, alone[1:])), abs=1e-5)
    assert parts["fused"].item() == pytest.approx(parts["fused_bce"].item() + parts["fused_iou"].item(), abs=1e-6)
    assert not any(p.requires_grad for p in parts.values())  # components are for logging only


@pytest.mark.parametrize("kind", ["bce_iou", "structure", "dice"])
def test_float32_under_bf16_autocast(kind):
    loss = build_loss(LossConfig(kind=kind))
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(2, 1, 33, 17, generator=g).bfloat16().requires_grad_() for _ in range(5)]
    target = (torch.rand(2, 1, 33, 17, generator=g) > 0.7).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = loss(logits, target)
    reference, _ = loss([t.detach().float() for t in logits], target)
    assert total.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())
    assert total.item() == pytest.approx(reference.item(), abs=1e-6)
    total.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in logits)


def test_errors_name_the_problem():
    loss = build_loss(LossConfig())
    with pytest.raises(ValueError, match=r"output 'fused' has shape \(1, 1, 4, 4\) but the target has \(1, 1, 8, 8\)"):
        loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="got 3 outputs; it takes the fused output alone or all 5"):
        loss([torch.zeros(1, 1, 4, 4)] * 3, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ConfigError, match=r"loss.side_weights must all be >= 0, got \[0.5, -1.0, 0.1, 0.1\]"):
        load_config(None, ["loss.side_weights=[0.5, -1, 0.1, 0.1]"])
    # One weight per side logit of the network, checked when the run builds it (salnet's FPN has 4).
    with pytest.raises(
        ConfigError, match=r"FPN \+ PPM returns 4 side logits in training, but loss.side_weights=\[1.0, 1.0\] weighs 2"
    ):
        check_side_weights(load_config(None, ["loss.side_weights=[1, 1]"]).loss, 4, "salnet's FPN + PPM")
