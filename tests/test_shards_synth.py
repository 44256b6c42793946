"""The built-in demo set: deterministic, complete shards; hard for brightness, solvable by colour."""

import numpy as np
import pytest
from PIL import Image

from salnet.shards.manifest import ShardsError, load_manifest
from salnet.shards.synth import synthesize

from conftest import run_py
from shards_data import decoded, read_samples


def shard_bytes(shard_dir):
    return {p.name: p.read_bytes() for p in sorted(shard_dir.glob("*.tar"))}


def f_curve(score: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """F-measure (beta^2 = 0.3) of `score >= t` against `mask >= 128` for t = 0..255."""
    fg = mask >= 128
    at_least = lambda hist: np.cumsum(hist[::-1])[::-1]  # noqa: E731 - pixels with score >= t
    tp = at_least(np.bincount(score[fg], minlength=256))
    predicted = at_least(np.bincount(score.ravel(), minlength=256))
    precision = tp / np.maximum(predicted, 1)
    recall = tp / max(fg.sum(), 1)
    return 1.3 * precision * recall / np.maximum(0.3 * precision + recall, 1e-12)


def max_f(scores_and_masks) -> float:
    """maxF as SOD papers report it: the mean F curve over images, then its maximum."""
    return float(np.mean([f_curve(s, m) for s, m in scores_and_masks], axis=0).max())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo-sized scenes (96 px, as configs/demo.yaml trains), enough for stable statistics."""
    root = tmp_path_factory.mktemp("demo")
    synthesize(root, train=300, val=20, size=96, seed=0)
    return [decoded(s) for s in read_samples(root / "train")]


def test_gray_level_threshold_scores_low_but_colour_contrast_finds_the_objects(demo):
    gray = [(np.asarray(Image.fromarray(image).convert("L")), mask) for image, mask, _ in demo]
    inverted = [(255 - g, m) for g, m in gray]
    assert max(max_f(gray), max_f(inverted)) < 0.6  # brightness alone does not give the objects away

    def chroma_contrast(image):
        """Distance of each pixel's colour (Cb, Cr) from the image's median colour: the background's."""
        cbcr = np.asarray(Image.fromarray(image).convert("YCbCr"), dtype=np.float32)[..., 1:]
        distance = np.linalg.norm(cbcr - np.median(cbcr.reshape(-1, 2), axis=0), axis=-1)
        return np.clip(distance * 4, 0, 255).astype(np.uint8)

    # The signal a network must learn is there: a one-line colour cue already scores high.
    assert max_f([(chroma_contrast(image), mask) for image, mask, _ in demo]) > 0.8


def test_scenes_are_varied_with_exact_binary_masks(demo):
    fractions = np.array([(mask >= 128).mean() for _, mask, _ in demo])
    assert all(set(np.unique(mask)) <= {0, 255} for _, mask, _ in demo)
    assert fractions.min() > 0.003 and fractions.max() > 0.3 and 0.08 < np.median(fractions) < 0.3
    assert len({image[0, 0].tobytes() for image, _, _ in demo}) > 250  # backgrounds differ
    meta = demo[0][2]
    assert meta["dataset"] == "synth-train" and meta["orig_size"] == meta["stored_size"] == [96, 96]


def test_synth_is_deterministic_per_seed_and_independent_of_workers(tmp_path):
    a_train, a_val = synthesize(tmp_path / "a", train=24, val=6, size=48, seed=3, shard_samples=10)
    b_train, b_val = synthesize(tmp_path / "b", train=24, val=6, size=48, seed=3, shard_samples=10, workers=2)
    assert (a_train, a_val) == (tmp_path / "a" / "train", tmp_path / "a" / "val")
    assert shard_bytes(a_train) == shard_bytes(b_train) and shard_bytes(a_val) == shard_bytes(b_val)
    assert [s["samples"] for s in load_manifest(a_train)["shards"]] == [10, 10, 4]
    synthesize(tmp_path / "c", train=24, val=6, size=48, seed=4, shard_samples=10)
    assert shard_bytes(tmp_path / "c" / "train") != shard_bytes(a_train)
    train_images = {s["jpg"] for s in read_samples(a_train)}
    assert not train_images & {s["jpg"] for s in read_samples(a_val)}  # val scenes are not train scenes


def test_synth_cli_writes_the_same_as_the_api_and_refuses_to_overwrite(tmp_path):
    run_py(
        ["-m", "salnet.shards", "synth", tmp_path / "cli", "--train", "6", "--val", "3", "--size", "40", "--seed", "1"]
    )
    synthesize(tmp_path / "api", train=6, val=3, size=40, seed=1)
    for split in ("train", "val"):
        assert shard_bytes(tmp_path / "cli" / split) == shard_bytes(tmp_path / "api" / split)
    assert load_manifest(tmp_path / "cli" / "val")["command"].endswith(
        "synth " + str(tmp_path / "cli") + " --train 6 --val 3 --size 40 --seed 1"
    )
    refused = run_py(["-m", "salnet.shards", "synth", tmp_path / "cli", "--train", "6", "--val", "3"], check=False)
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--overwrite" in refused.stderr
    with pytest.raises(ShardsError, match="at least one train and one val scene"):
        synthesize(tmp_path / "none", train=0, val=1)
