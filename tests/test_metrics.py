"""salnet.metrics against PySODMetrics 1.6.2 (the reference), sharded over real gloo ranks, and its API."""

import json
import math
import sys

import cv2
import numpy as np
import py_sod_metrics
import pytest
import torch

from salnet.bench.metrics import run_reference
from salnet.metrics import DEFAULT_FAMILIES, FAMILIES, SODMetrics
from salnet.metrics.inputs import to_foreground
from salnet.metrics.reference_float import numpy_mean_of_constant_block

from conftest import REPO, forked_run, ranks
from metrics_shard_probe import sample_pairs

PROBE = REPO / "tests" / "metrics_shard_probe.py"


# --------------------------------------------------------------------------------------------
# Helpers: the reference on the same data, saved as 8-bit images
# --------------------------------------------------------------------------------------------


def saved_png(pred: torch.Tensor) -> np.ndarray:
    """What `(p * 255).astype(np.uint8)` stores, in p's precision (half types widened to float32)."""
    return (pred.to(torch.promote_types(pred.dtype, torch.float32)).numpy() * 255).astype(np.uint8)


def saved_mask(gt: torch.Tensor) -> np.ndarray:
    if gt.dtype == torch.bool:
        return gt.numpy().astype(np.uint8) * 255
    if gt.is_floating_point():
        return (gt.numpy() * 255).astype(np.uint8)
    return gt.numpy().astype(np.uint8)


def reference(pairs, families=DEFAULT_FAMILIES) -> dict:
    return run_reference(families, [saved_png(p) for p, _ in pairs], [saved_mask(g) for _, g in pairs])


def ours(pairs, families=DEFAULT_FAMILIES) -> dict:
    metrics = SODMetrics(families)
    metrics.update([p for p, _ in pairs], [g for _, g in pairs])
    return metrics.compute()


def assert_matches_reference(pairs, families=DEFAULT_FAMILIES):
    """Within 1e-6, relative above 1 (a 1x1 image's E-measure is 1 / eps in the reference)."""
    got, want = ours(pairs, families), reference(pairs, families)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert not math.isnan(value), f"the reference gives NaN for {key}: test data must avoid it"
        assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), (key, got[key], value)


def blob(height, width, top, left, bottom, right, value=255):
    gt = torch.zeros(height, width, dtype=torch.uint8)
    gt[top:bottom, left:right] = value
    return gt


# --------------------------------------------------------------------------------------------
# Exactness against PySODMetrics
# --------------------------------------------------------------------------------------------


def test_random_images_of_mixed_sizes_in_one_update_match_the_reference():
    gen = torch.Generator().manual_seed(1)
    pairs = []
    for height, width in [(31, 47), (47, 31), (20, 20), (64, 48), (5, 90), (31, 47)] * 3:
        gt = blob(
            height,
            width,
            *(torch.randint(0, min(height, width) // 2, (2,), generator=gen).tolist()),
            height - 1,
            width - 2,
        )
        pred = (0.6 * (gt > 128) + 0.4 * torch.rand(height, width, generator=gen)).float()
        pairs.append((pred, gt))
    assert_matches_reference(pairs)


# PySODMetrics' own warnings on its way to NaN (the mean of an empty quadrant).
reference_nan_warnings = pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")


def _constant(height, width, value):
    return torch.full((height, width), value, dtype=torch.float32)


EDGE_CASES = {
    "empty GT": [
        (torch.rand(13, 17, generator=torch.Generator().manual_seed(2)), torch.zeros(13, 17, dtype=torch.uint8))
    ],
    "full GT": [
        (torch.rand(13, 17, generator=torch.Generator().manual_seed(3)), torch.full((13, 17), 255, dtype=torch.uint8))
    ],
    # Constant predictions skip min-max normalisation, and where the GT is uniform over a quadrant
    # the reference's S-measure hinges on numpy's rounding of the mean (reference_float.py).
    "constant prediction": [
        (_constant(h, w, c), g)
        for c in (0.0, 0.3, 0.5, 0.77, 1.0)
        for h, w in [(5, 7), (12, 20), (33, 47), (64, 48), (130, 9)]
        for g in (blob(h, w, 0, 0, h, w // 2), blob(h, w, h // 3, 0, h, w), blob(h, w, 1, 1, h - 1, w - 1))
    ],
    "constant prediction, empty and full GT": [
        (_constant(9, 11, c), torch.full((9, 11), v, dtype=torch.uint8)) for c in (0.0, 0.4, 1.0) for v in (0, 255)
    ],
    "1x1": [(torch.tensor([[p]]), torch.tensor([[g]], dtype=torch.uint8)) for p in (0.0, 0.6, 1.0) for g in (0, 255)],
    # (One row or one column with mixed GT is NaN in the reference: see the NaN test.)
    "non-square": [
        (torch.rand(h, w, generator=torch.Generator().manual_seed(h)), blob(h, w, h // 3, w // 3, h, w))
        for h, w in [(2, 31), (31, 2), (4, 50), (50, 4)]
    ],
    "soft uint8 GT": [
        (
            torch.rand(25, 25, generator=torch.Generator().manual_seed(4)),
            torch.arange(625).remainder(256).to(torch.uint8).view(25, 25),
        )
    ],
    "soft float GT": [
        (
            torch.rand(16, 16, generator=torch.Generator().manual_seed(5)),
            (torch.arange(256, dtype=torch.float32) / 255).view(16, 16),
        )
    ],
    "bool GT": [(torch.rand(10, 12, generator=torch.Generator().manual_seed(6)), blob(10, 12, 2, 3, 8, 9) > 0)],
    "float64 predictions": [
        (
            torch.rand(19, 21, generator=torch.Generator().manual_seed(7), dtype=torch.float64),
            blob(19, 21, 4, 4, 15, 15),
        )
    ],
    # Few distinct values: ties at the adaptive threshold and between curve bins.
    "binary prediction": [
        (blob(12, 12, 2, 2, 9, 9).float() / 255, blob(12, 12, 3, 3, 10, 10)),
        (blob(12, 12, 0, 0, 6, 12).float() / 255, blob(12, 12, 0, 0, 6, 12)),
    ],
    "three levels": [((torch.arange(90) % 3).float().view(9, 10) / 2, blob(9, 10, 0, 0, 9, 5))],
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_match_the_reference(case):
    assert_matches_reference(EDGE_CASES[case])


@reference_nan_warnings
def test_every_2x2_mask_matches_the_reference_where_it_is_defined():
    pred = torch.tensor([[0.1, 0.9], [0.45, 0.7]])
    for pattern in range(16):
        gt = torch.tensor([(pattern >> bit) & 1 for bit in range(4)], dtype=torch.uint8).view(2, 2) * 255
        want, got = reference([(pred, gt)]), ours([(pred, gt)])
        for key, value in want.items():
            if math.isnan(value):
                assert key == "S" and math.isfinite(got[key])  # see the next test for its value
            else:
                assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), (pattern, key, got[key], value)


def _s_measure_without_empty_quadrants(pred_u8: np.ndarray, gt_u8: np.ndarray) -> float:
    """The documented value where PySODMetrics' S-measure is NaN: its own object and ssim terms,
    with empty quadrants (zero weight) left out instead of contributing 0 * NaN."""
    pred, gt = py_sod_metrics.utils.prepare_data(pred_u8, gt_u8)
    sm = py_sod_metrics.Smeasure()
    height, width = gt.shape
    cy, cx = (int(c) + 1 for c in np.argwhere(gt).mean(axis=0).round())
    region = 0.0
    for rows, cols in [
        ((0, cy), (0, cx)),
        ((0, cy), (cx, width)),
        ((cy, height), (0, cx)),
        ((cy, height), (cx, width)),
    ]:
        block = (slice(*rows), slice(*cols))
        if pred[block].size:
            region += sm.ssim(pred[block], gt[block]) * pred[block].size / (height * width)
    return max(0.0, 0.5 * sm.object(pred, gt) + 0.5 * region)


@reference_nan_warnings
@pytest.mark.parametrize(
    "gt_rows", [[[0, 255], [0, 255]], [[0, 0], [255, 255]], [[0, 0], [0, 255]], [[0, 255, 255, 0, 0]]]
)
def test_where_the_reference_s_measure_is_nan_empty_quadrants_count_zero(gt_rows):
    gt = torch.tensor(gt_rows, dtype=torch.uint8)
    pred = torch.linspace(0.1, 0.9, gt.numel()).view(gt.shape)
    assert math.isnan(reference([(pred, gt)], ("S",))["S"])  # the centroid sits on the last row or column
    expected = _s_measure_without_empty_quadrants(saved_png(pred), gt.numpy())
    assert abs(ours([(pred, gt)], ("S",))["S"] - expected) <= 1e-12


def test_curves_match_the_reference_curves():
    pairs = sample_pairs(count=10, seed=3)
    metrics = SODMetrics(("F", "E"))
    metrics.update([p for p, _ in pairs], [g for _, g in pairs])
    curves = metrics.curves()
    with pytest.warns(UserWarning):  # PySODMetrics announces Fmeasure's retirement
        fm = py_sod_metrics.Fmeasure()
    em = py_sod_metrics.Emeasure()
    for pred, gt in pairs:
        fm.step(saved_png(pred), saved_mask(gt))
        em.step(saved_png(pred), saved_mask(gt))
    want = {**fm.get_results()["pr"], "F": fm.get_results()["fm"]["curve"], "E": em.get_results()["em"]["curve"]}
    assert curves["threshold"] == list(range(255, -1, -1))
    for ours_key, ref_key in [("precision", "p"), ("recall", "r"), ("F", "F"), ("E", "E")]:
        assert len(curves[ours_key]) == 256
        np.testing.assert_allclose(curves[ours_key], want[ref_key], rtol=0, atol=1e-6, err_msg=ours_key)


def test_numpy_mean_emulation_tracks_the_installed_numpy():
    rng = np.random.default_rng(0)
    inexact = 0
    for _ in range(400):
        height, width = int(rng.integers(1, 200)), int(rng.integers(1, 300))
        rows, cols = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        value = int(rng.integers(0, 256)) / 255
        if rng.random() < 0.5:  # a min-max normalised level, as the S-measure sees it
            value = (value - 3 / 255) / (250 / 255 - 3 / 255)
        block = np.full((height, width), value)[height - rows :, width - cols :]
        assert numpy_mean_of_constant_block(value, rows, cols, width) == np.mean(block), (value, rows, cols, width)
        inexact += np.mean(block) != value
    assert inexact > 50  # the rounding this reproduces is common, not a corner case


# --------------------------------------------------------------------------------------------
# The opt-in families (IoU, Dice, BER, MSIoU, SI-MAE, SI-F, HCE) against PySODMetrics
# --------------------------------------------------------------------------------------------

OPT_IN = tuple(f for f in FAMILIES if f not in DEFAULT_FAMILIES)
# The reference's size-invariant metrics fail where the objects' boxes cover every pixel (an
# assertion for a full GT, NaN SI-MAE for a frame): see the test after the edge cases.
WITHOUT_SI = tuple(f for f in OPT_IN if not f.startswith("SI-"))


def scene(height: int, width: int, seed: int):
    """A PySODMetrics-like test pair: a large object with a hole, two small objects of the same area
    (under SI's 50 pixels), a thin diagonal line (HCE's skeleton), and a prediction that blurs the
    mask, adds noise and misses part of the large object."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    cy, cx = int(rng.integers(height // 3, height // 2)), int(rng.integers(width // 3, width // 2))
    cv2.ellipse(mask, (cx, cy), (width // 4, height // 4), float(rng.integers(0, 180)), 0, 360, 255, -1)
    cv2.circle(mask, (cx, cy), 3, 0, -1)
    mask[height - 6 : height - 2, 2:8] = 255
    mask[2:6, width - 8 : width - 2] = 255
    cv2.line(mask, (width // 2, height - 3), (width - 4, height // 2), 255, 1)
    blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 2) / 255
    pred = np.clip(0.8 * blurred + 0.2 * rng.random(mask.shape), 0, 1)
    pred[cy:, :cx] *= 0.3
    return torch.from_numpy(pred.astype(np.float32)), torch.from_numpy(mask)


def test_opt_in_families_match_the_reference_on_random_maps():
    gen = torch.Generator().manual_seed(11)
    pairs = [
        # Noise GT: over 2048 edge pixels, where the reference's float16 sum of MSIoU's GT edges rounds.
        (torch.rand(40, 70, generator=gen), (torch.rand(40, 70, generator=gen) > 0.6).to(torch.uint8) * 255),
        (torch.rand(23, 37, generator=gen), blob(23, 37, 4, 5, 19, 30)),
        (torch.rand(30, 30, generator=gen, dtype=torch.float64), blob(30, 30, 0, 0, 30, 12)),
        (torch.rand(17, 9, generator=gen), torch.zeros(17, 9, dtype=torch.uint8)),
    ]
    gt_edges = py_sod_metrics.MSIoU(False, False).get_edge(pairs[0][1].numpy() > 128)
    assert gt_edges.sum() > 2048 and np.count_nonzero(gt_edges) != gt_edges.sum()
    assert_matches_reference(pairs, OPT_IN)


def test_opt_in_families_match_the_reference_on_scenes_with_many_objects():
    # And objects all under 50 pixels: the largest ones (two of the same area) are SI's objects.
    small = blob(30, 34, 2, 2, 8, 8) | blob(30, 34, 20, 24, 26, 30) | blob(30, 34, 12, 3, 15, 6)
    pairs = [scene(64, 80, seed=0), scene(72, 56, seed=1), (torch.rand(30, 34, generator=torch.Generator()), small)]
    assert_matches_reference(pairs, OPT_IN)


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_opt_in_families_match_the_reference_on_the_edge_cases(case):
    pairs = EDGE_CASES[case]
    covered = any(bool(to_foreground(g).all()) for _, g in pairs)
    assert_matches_reference(pairs, WITHOUT_SI if covered else OPT_IN)


def test_where_the_objects_boxes_cover_every_pixel_the_background_weighs_zero():
    """The documented values where the reference fails: one object whose box is the whole image,
    so SI-F is the plain F-measure and SI-MAE the plain MAE."""
    gen = torch.Generator().manual_seed(12)
    frame = torch.full((20, 24), 255, dtype=torch.uint8)
    frame[3:-3, 3:-3] = 0
    for gt in (torch.full((20, 24), 255, dtype=torch.uint8), frame):
        pairs = [(torch.rand(20, 24, generator=gen), gt)]
        got = ours(pairs, ("F", "MAE", "SI-F", "SI-MAE"))
        assert got["SI-MAE"] == pytest.approx(got["MAE"], abs=1e-12)
        for name in ("maxF", "meanF", "adpF"):
            assert got[f"SI-{name}"] == pytest.approx(got[name], abs=1e-12), name
    with pytest.warns(RuntimeWarning):  # 0 / 0
        assert math.isnan(reference(pairs, ("SI-MAE",))["SI-MAE"])
    assert_matches_reference(pairs, ("SI-F",))
    assert got["MAE"] == pytest.approx(reference(pairs, ("MAE",))["MAE"], abs=1e-12)


def test_split_accumulators_merged_equal_one_process():
    """Two "ranks" each sum their share; adding the sums (what all_reduce does) gives one process's values."""
    pairs = sample_pairs(count=10, seed=6) + [scene(40, 48, seed=2)]
    single = SODMetrics(FAMILIES)
    single.update(*zip(*pairs))
    shares = [SODMetrics(FAMILIES), SODMetrics(FAMILIES)]
    shares[0].update(*zip(*pairs[::2]))
    shares[1].update(*zip(*pairs[1::2]))
    merged = SODMetrics(FAMILIES)
    merged.load_state_dict({"metrics": list(FAMILIES), "sums": sum(m.state_dict()["sums"] for m in shares)})
    assert merged.num_images == len(pairs)
    want = single.compute()
    assert set(want) >= {"maxMSIoU", "SI-maxF", "HCE", "adpBER"}
    for key, value in merged.compute().items():
        assert abs(value - want[key]) <= 1e-12 * max(1.0, abs(want[key])), key


def test_hce_without_scikit_image_is_an_error_naming_the_package(monkeypatch, capsys):
    from salnet.config import ConfigError, load_config
    from salnet.evaluation import evaluate
    from salnet.metrics import MissingPackageError

    monkeypatch.setitem(sys.modules, "skimage", None)  # what an absent package looks like to import
    with pytest.raises(MissingPackageError, match=r"HCE metric needs scikit-image.*pip install scikit-image"):
        SODMetrics(("F", "HCE"))
    with pytest.raises(ConfigError, match=r"eval.metrics=\['HCE'\]: the HCE metric needs scikit-image"):
        load_config(None, ["eval.metrics=[HCE]", "eval.best_metric=HCE"])
    with pytest.raises(SystemExit) as exit_:
        evaluate.parse_args(["--pred", "maps", "--gt", "masks", "--metrics", "F", "HCE"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--metrics: the HCE metric needs scikit-image" in err and "Traceback" not in err
    assert set(ours(sample_pairs(count=2), ("F", "SI-F", "MSIoU"))) >= {"maxF", "SI-maxF", "maxMSIoU"}


# --------------------------------------------------------------------------------------------
# Sharding: a real gloo process group
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_over_ranks_equals_one_process(world, tmp_path):
    out = tmp_path / "metrics.json"
    if world == 1:
        forked_run([PROBE, out])
    else:
        # With 4 ranks the last one gets no image at all and must still join the all-reduce.
        ranks(world, [PROBE, out, *(["--idle-last-rank"] if world == 4 else [])])
    sharded = json.loads(out.read_text())
    pairs = sample_pairs()
    single = SODMetrics(FAMILIES)
    single.update([p for p, _ in pairs], [g for _, g in pairs])
    assert (sharded["world"], sharded["images"]) == (world, len(pairs))
    for key, value in single.compute().items():
        assert abs(sharded["values"][key] - value) <= 1e-9, key
    for key, curve in single.curves().items():
        np.testing.assert_allclose(sharded["curves"][key], curve, rtol=0, atol=1e-9, err_msg=key)


# --------------------------------------------------------------------------------------------
# API: input forms, families, errors, state
# --------------------------------------------------------------------------------------------


def test_batch_tensors_lists_and_gt_dtypes_agree():
    gen = torch.Generator().manual_seed(8)
    preds = torch.rand(3, 11, 13, generator=gen)
    gts = (torch.rand(3, 11, 13, generator=gen) > 0.6).to(torch.uint8) * 255
    results = []
    for p, g in [
        (preds, gts),
        (preds[:, None], gts[:, None]),
        (list(preds), list(gts)),
        (list(preds[:, None]), gts > 128),
        (preds, gts.long()),
        (preds.double(), gts.float() / 255),
    ]:
        metrics = SODMetrics(FAMILIES)
        metrics.update(p, g)
        results.append(metrics.compute())
    for other in results[1:]:
        for key in results[0]:
            assert abs(other[key] - results[0][key]) <= 1e-12, key


def test_half_precision_predictions_equal_their_float32_values():
    gen = torch.Generator().manual_seed(9)
    gts = (torch.rand(2, 15, 9, generator=gen) > 0.5).to(torch.uint8) * 255
    for dtype in (torch.float16, torch.bfloat16):
        preds = torch.rand(2, 15, 9, generator=gen).to(dtype)
        assert ours(list(zip(preds, gts))) == ours(list(zip(preds.float(), gts)))


def test_selected_families_give_only_their_keys():
    pairs = sample_pairs(count=4)
    assert set(ours(pairs, ("S", "MAE"))) == {"S", "MAE"}
    assert set(ours(pairs, ("wF",))) == {"wF"}
    assert SODMetrics("MAE").metrics == ("MAE",)  # one name is one family, not its letters
    assert set(ours(pairs, ("E", "F"))) == {"maxF", "meanF", "adpF", "maxE", "meanE", "adpE"}
    only_e = SODMetrics(("E",))
    only_e.update(*zip(*pairs))
    assert set(only_e.curves()) == {"threshold", "E"}


def test_bad_inputs_are_refused_and_leave_the_state_untouched():
    metrics = SODMetrics()
    metrics.update(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.uint8))
    before = metrics.state_dict()["sums"]
    good = torch.rand(4, 4)
    cases = [
        (
            ValueError,
            r"shape \(2, 5, 4\) but ground truths have shape \(2, 4, 5\)",
            torch.rand(2, 5, 4),
            torch.zeros(2, 4, 5, dtype=torch.uint8),
        ),
        (
            ValueError,
            r"prediction 1 has shape \(4, 5\) but its ground truth has shape \(5, 4\)",
            [good, torch.rand(4, 5)],
            [torch.zeros(4, 4), torch.zeros(5, 4)],
        ),
        (
            ValueError,
            r"predictions must lie in \[0.0, 1.0\]",
            [good, torch.full((3, 3), 1.5)],
            [torch.zeros(4, 4), torch.zeros(3, 3)],
        ),
        (ValueError, r"predictions must lie in \[0.0, 1.0\]", torch.full((1, 2, 2), -0.1), torch.zeros(1, 2, 2)),
        (
            ValueError,
            r"predictions must lie in \[0.0, 1.0\]",
            torch.full((1, 2, 2), float("nan")),
            torch.zeros(1, 2, 2),
        ),
        (ValueError, r"ground truths must lie in \[0, 1\]", torch.rand(1, 2, 2), torch.full((1, 2, 2), 255.0)),
        (ValueError, r"ground truths must lie in \[0, 255\]", torch.rand(1, 2, 2), torch.full((1, 2, 2), 300)),
        (
            TypeError,
            r"predictions have dtype torch.uint8",
            torch.zeros(1, 2, 2, dtype=torch.uint8),
            torch.zeros(1, 2, 2),
        ),
        (
            TypeError,
            r"ground truths have dtype torch.complex64",
            torch.rand(1, 2, 2),
            torch.zeros(1, 2, 2, dtype=torch.complex64),
        ),
        (ValueError, r"got 2 predictions but 1 ground truths", [good, good], [torch.zeros(4, 4)]),
        (
            ValueError,
            r"\[B, H, W\] or \[B, 1, H, W\], got shape \(1, 3, 4, 4\)",
            torch.rand(1, 3, 4, 4),
            torch.zeros(1, 3, 4, 4),
        ),
        (ValueError, r"have no pixels", torch.rand(1, 0, 4), torch.zeros(1, 0, 4)),
        (TypeError, r"expected a tensor or a list of tensors, got ndarray", np.zeros((1, 2, 2)), np.zeros((1, 2, 2))),
    ]
    for error, message, preds, gts in cases:
        with pytest.raises(error, match=message):
            metrics.update(preds, gts)
    assert torch.equal(metrics.state_dict()["sums"], before) and metrics.num_images == 1


def test_construction_and_empty_state_errors():
    with pytest.raises(ValueError, match=r"\['Fbeta'\]; choose among F, E, S, wF, MAE, IoU, Dice"):
        SODMetrics(("Fbeta", "S"))
    with pytest.raises(ValueError, match="none chosen"):
        SODMetrics(())
    with pytest.raises(RuntimeError, match="counted no images"):
        SODMetrics().compute()


def test_state_dict_continues_an_interrupted_evaluation(tmp_path):
    pairs = sample_pairs(count=12, seed=4)
    full = SODMetrics(FAMILIES)
    full.update(*zip(*pairs))

    first = SODMetrics(FAMILIES)
    first.update(*zip(*pairs[:5]))
    torch.save(first.state_dict(), tmp_path / "eval.pt")
    resumed = SODMetrics(FAMILIES)
    resumed.load_state_dict(torch.load(tmp_path / "eval.pt", weights_only=True))
    resumed.update(*zip(*pairs[5:]))
    assert resumed.num_images == 12
    for key, value in full.compute().items():
        assert abs(resumed.compute()[key] - value) <= 1e-12, key

    with pytest.raises(ValueError, match=r"state holds metrics \['F', 'E', 'S', 'wF', 'MAE', 'IoU',"):
        SODMetrics(("F",)).load_state_dict(first.state_dict())


def test_reset_forgets_everything():
    metrics = SODMetrics()
    metrics.update(*zip(*sample_pairs(count=3)))
    assert metrics.num_images == 3
    metrics.reset()
    assert metrics.num_images == 0
    with pytest.raises(RuntimeError, match="counted no images"):
        metrics.compute()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_predictions_give_the_cpu_result():
    pairs = sample_pairs(count=10, seed=5)
    cpu = ours(pairs)
    metrics = SODMetrics(FAMILIES, device="cuda")
    metrics.update([p.cuda() for p, _ in pairs], [g for _, g in pairs])  # GT on the host: moved over
    for key, value in metrics.compute().items():
        assert abs(value - cpu[key]) <= 1e-12, key


@pytest.mark.parametrize("families", [FAMILIES, ("MAE",), ("S", "F"), ("wF", "E"), ("BER", "SI-F", "HCE")])
def test_the_config_names_what_compute_returns_and_which_way_is_better(families):
    """One list of names: the config's choices, SODMetrics.compute() and best-keeping agree."""
    from salnet.config import ConfigError, load_config
    from salnet.metrics import LOWER_IS_BETTER, METRICS, is_better, metric_names

    pairs = [(torch.rand(9, 7), blob(9, 7, 2, 2, 6, 5))]
    computed = ours(pairs, families)
    assert list(computed) == metric_names(families)
    for name in METRICS:  # exactly the computed ones are valid best metrics, alone or for a set
        for best in (name, f"val/{name}"):
            overrides = [f"eval.metrics={list(families)}", f"eval.best_metric={best}"]
            if name in computed:
                assert load_config(None, overrides).eval.best_metric == best
            else:
                with pytest.raises(ConfigError, match="is not computed by eval.metrics"):
                    load_config(None, overrides)
    assert LOWER_IS_BETTER == {"MAE", "maxBER", "meanBER", "adpBER", "SI-MAE", "HCE"}
    assert is_better("MAE", 0.1, 0.2) and not is_better("maxF", 0.1, 0.2) and is_better("S", 0.5, None)
