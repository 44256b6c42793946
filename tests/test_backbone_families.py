"""Every guarantee of the ResNet backbones, for the Swin, ConvNeXt, ViT and timm families (issue 21, item 4):
training keeps best.pt, DDP and ZeRO give the same best.pt, resume is bitwise, TorchScript and ONNX
exports match eager PyTorch at two sizes, predict and evaluate score what validation scored (CPU, random
init, 64-72 px, two real ranks on gloo, real DeepSpeed).

Each family's runs share one job (family_probe.py): torch's and DeepSpeed's start-up, most of a
tiny run's cost, is paid once. What differs by family is the model: its parameters (ZeRO
partitions them), its random numbers (Swin's and ConvNeXt's stochastic depth draws in every
training step: resume must restore them) and its operations (the padding and cropping of the
seams, ViT's position embeddings resized to each input: traced for TorchScript at one size, they
must hold at another). The training loop, the checkpoint and the validation around the model are
family-independent: test_train, test_train_stop and test_deepspeed cover them (resnet18).
"""

import json
import shutil

import pytest
import timm
import torch
from test_deepspeed import assert_best_is_what_validation_saw, assert_equal_trees
from test_train import records, tiny_config
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from salnet.config import BACKBONE_FAMILIES, BATCHNORM_FAMILIES, ConfigError, load_config
from salnet.evaluation import evaluate, predict
from salnet.evaluation.common import EvaluationError
from salnet.evaluation.export import Saliency, export, export_onnx, fixed_size_reason
from salnet.model.fpn import FeaturePyramid
from salnet.model.head import FusionHead
from salnet.model.ppm import PyramidPooling
from salnet.model.salnet import SalNet
from salnet.model.stages import StageBackbone
from salnet.model.timm_backbone import TimmBackbone
from salnet.model.vit_pyramid import ViTPyramid
from salnet.run.checkpoint import load_best
from salnet.run.rundir import RunDir
from salnet.shards.synth import synthesize

from conftest import REPO, ranks

PROBE = REPO / "tests" / "family_probe.py"
# The smallest member of each family, at its training size: Swin's is not a multiple of 32 (the seam
# pads and crops). Their larger siblings differ in widths and depths only.
FAMILIES = {"swin_t": 72, "convnext_tiny": 64, "vit_b_16": 64, "timm/pvt_v2_b0": 64}
STEPS = 2
# Resumed: the families whose training draws random numbers of its own (Swin's and ConvNeXt's stochastic
# depth, in every step), which the checkpoint must restore. torchvision's ViT has no drop path: its
# resume is the family-independent loop that test_train_stop covers (and a ViT-B checkpoint is 1 GB).
RESUMED = ("swin_t", "convnext_tiny")
# ZeRO-2 and ZeRO-3 on every family. ZeRO-3 is the stage a family can break: it gathers each module's
# parameters when that module's forward starts (a parameter read outside it would be missing), and
# DeepSpeed's ZeRO-3 replaces torch's Linear by its own unless salnet turns that off (zero_config).
ZERO_RUNS = [(name, stage) for stage in (2, 3) for name in FAMILIES]
TOLERANCE = 1e-4  # salnet.export's default


def slug(name):
    """The run name of backbone `name` (a timm name has a slash)."""
    return name.replace("/", "_")


def run_config(root, shards, name, run, size, **train):
    """Run `run`: STEPS steps (validated and saved after each) of backbone `name` at `size` px."""
    (root / run).mkdir()
    path, _ = tiny_config(
        root / run,
        shards,
        name=run,
        data={"size": size, "eval_size": size, "batch_size": 2, "eval_batch_size": 3},
        model={"backbone": {"name": name}},
        # A constant rate: every step moves the weights, the last one too.
        optim={"schedule": "constant", "warmup_steps": 0},
        # DeepSpeed never holds its parameters channels_last: both strategies in one memory layout.
        train={"steps": STEPS, "channels_last": False, **train},
        eval={"every": 1},
        # The checkpoint before the last only where a run resumes from it: a ViT-B checkpoint is 1.4 GB.
        checkpoint={"every": 1 if run in (f"{slug(n)}-ddp" for n in RESUMED) else STEPS},
        log={"every": 1, "plots": False},
    )
    return path


def run_dir(root, run):
    """Of a resumed DDP run: the uninterrupted one (family_probe.py moved it aside)."""
    directory = root / run / "runs" / run
    return directory.with_name(f"{run}-uninterrupted") if run.removesuffix("-ddp") in RESUMED else directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    # 6 val images of 72 px on 2 ranks: one batch of 3 each.
    train, val = synthesize(root / "shards", train=16, val=6, size=72, seed=3)
    shards = {"train": train, "val": val}
    cases = [
        f"{run_config(root, shards, name, f'{slug(name)}-ddp', size)}" + (":resume" if name in RESUMED else "")
        for name, size in FAMILIES.items()
    ]
    for name, stage in ZERO_RUNS:
        zero = {"strategy": "deepspeed", "zero_stage": stage, "timeout_s": 60}
        cases.append(str(run_config(root, shards, name, f"{slug(name)}-zero{stage}", FAMILIES[name], **zero)))
    ranks(2, [PROBE, *cases], timeout=600)
    yield root, val
    shutil.rmtree(root)  # gigabytes of checkpoints: gone with the module, not at the end of the session


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_validates_and_keeps_best(runs, name):
    root, _ = runs
    directory = run_dir(root, f"{slug(name)}-ddp")
    vals = records(directory, "val")
    assert [v["step"] for v in vals] == [1, 2] and all(v["val/images"] == 6 for v in vals)
    best = assert_best_is_what_validation_saw(directory)
    assert best["step"] == max(vals, key=lambda v: v["val/maxF"])["step"]
    assert best["config"]["model"]["backbone"]["name"] == name


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMED)
def test_resume_from_the_checkpoint_before_the_last_is_bitwise_identical(runs, name):
    root, _ = runs
    last = f"step-{STEPS:08d}"
    uninterrupted = run_dir(root, f"{name}-ddp") / "checkpoints" / last
    resumed = root / f"{name}-ddp" / "runs" / f"{name}-ddp" / "checkpoints" / last
    uninterrupted, resumed = (torch.load(d / "state.pt", weights_only=True) for d in (uninterrupted, resumed))
    # Weights, optimizer state, step and data position, every rank's RNG streams: all of it.
    assert_equal_trees(uninterrupted, resumed)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "stage"), ZERO_RUNS)
def test_zero_keeps_the_best_pt_of_ddp(runs, name, stage):
    # AdamW without accumulation or clipping: bitwise (test_deepspeed says why), so also the same
    # validation metrics and the same best step.
    root, _ = runs
    ddp = load_best(RunDir(run_dir(root, f"{slug(name)}-ddp")).best)
    zero = load_best(RunDir(run_dir(root, f"{slug(name)}-zero{stage}")).best)
    assert (zero["step"], zero["metrics"]) == (ddp["step"], ddp["metrics"])
    assert_equal_trees(zero["model"], ddp["model"])


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_torchscript_export_matches_eager_pytorch_at_two_sizes(runs, name, tmp_path):
    # Traced at the run's eval size (Swin: 72 px, the others 64), checked at a multiple of 32 and off one.
    torch.set_num_threads(1)
    root, _ = runs
    best = RunDir(run_dir(root, f"{slug(name)}-ddp")).best
    result = export(best, "torchscript", tmp_path / "salnet.pt", [(64, 64), (72, 88)], TOLERANCE)
    assert list(result["parity"]) == ["2x3x64x64", "2x3x72x88"] and max(result["parity"].values()) <= TOLERANCE


@pytest.mark.slow
def test_onnx_export_of_a_family_best_pt_matches_eager_pytorch_at_two_sizes(runs, tmp_path):
    # salnet.export end to end on a family's best.pt (ConvNeXt: the Swin seam without Swin's window
    # mask): one graph for every size, exported at the eval size (64 px), checked at it and at 72x88.
    torch.set_num_threads(1)
    root, _ = runs
    best = RunDir(run_dir(root, "convnext_tiny-ddp")).best
    result = export(best, "onnx", tmp_path / "salnet.onnx", [(64, 64), (72, 88)], TOLERANCE)
    assert result["input_size"] is None
    assert list(result["parity"]) == ["2x3x64x64", "2x3x72x88"] and max(result["parity"].values()) <= TOLERANCE


def shallow_swin():
    swin = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=[7, 7]
    )
    return StageBackbone(swin.features, channels_last_stages=True), [16, 32, 64, 128]


def shallow_vit():
    vit = VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    return ViTPyramid(vit), [8, 16, 32, 32]


def shallow_pvt():
    features = timm.create_model("pvt_v2_b0", features_only=True, out_indices=(0, 1, 2, 3), depths=(1, 1, 1, 1))
    return TimmBackbone(features, channels_last=False, layer_groups=None), [32, 64, 160, 256]


def shallow_salnet(build):
    """salnet's network on a family's own code (torchvision's Swin and ViT, timm's PVT v2) at one block
    per stage and small widths, behind salnet's seam: the ONNX export of swin_t takes CPU-minutes, of
    vit_b_16 and pvt_v2_b0 about a minute (the graph grows with every block), of these seconds."""
    backbone, channels = build()
    norm = torch.nn.BatchNorm2d
    return SalNet(
        backbone,
        PyramidPooling(channels[3], 32, (1, 2, 3, 6), 32, norm),
        FeaturePyramid(channels[:3], 32, 32, norm),
        FusionHead(32, levels=4, fuse="concat", norm_layer=norm),
    ).eval()


@pytest.mark.slow
@pytest.mark.parametrize("build", [shallow_swin, shallow_vit, shallow_pvt], ids=["swin", "vit", "pvt_v2"])
def test_onnx_export_of_each_family_matches_eager_pytorch_at_two_sizes(build, tmp_path):
    # ViT and PVT: one graph for every size. Swin builds its shifted-window mask in Python from the
    # input size: a graph of one size, so it is exported at each size (fixed_size_reason says so).
    torch.set_num_threads(1)
    module = Saliency(shallow_salnet(build))
    fixed = fixed_size_reason(module) is not None
    assert fixed == (build is shallow_swin)
    run = None
    with torch.no_grad():
        for size in ((72, 88), (64, 64)):
            if run is None or fixed:
                run = export_onnx(module, torch.randn(2, 3, *size), tmp_path / "m.onnx", "{}", fixed_size=fixed)
            x = torch.randn(2, 3, *size)
            assert (run(x) - module(x)).abs().max().item() <= TOLERANCE, size


@pytest.mark.slow
def test_swin_onnx_export_refuses_a_check_at_another_size_naming_the_way_out(runs, tmp_path):
    root, _ = runs
    best = RunDir(run_dir(root, "swin_t-ddp")).best
    with pytest.raises(EvaluationError, match=r"--check-sizes 72x88: .* export it at that size with --onnx-size 72x88"):
        export(best, "onnx", tmp_path / "swin.onnx", [(72, 72), (72, 88)], TOLERANCE)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_predict_and_evaluate_score_a_swin_checkpoint_as_validation_did(runs, tmp_path):
    # One family: predict and evaluate build the network from best.pt's config (the family's part,
    # also what export loads) and then run the code of every family. Swin at 72 px: padded and cropped.
    torch.set_num_threads(1)
    root, val = runs
    best = RunDir(run_dir(root, "swin_t-ddp")).best
    evaluate.main(["--checkpoint", f"swin={best}", "--data", f"val={val}", "--workers", "0", "--out", str(tmp_path)])
    scored = json.loads((tmp_path / "results.json").read_text())["results"]["val"]["swin"]
    assert scored["images"] == 6
    for key, value in load_best(best)["metrics"].items():
        if key != "val/images":
            assert scored[key.removeprefix("val/")] == pytest.approx(value, abs=1e-6), key
    predict.main(["--checkpoint", str(best), f"val={val}", "--out", str(tmp_path / "maps"), "--workers", "0"])
    assert len(list((tmp_path / "maps" / "val").glob("*.png"))) == 6


@pytest.mark.parametrize("family", [f for f in BACKBONE_FAMILIES if f not in BATCHNORM_FAMILIES])
def test_frozen_bn_is_refused_where_the_family_has_no_batchnorm_and_group_norm_is_the_decoders(family):
    name = BACKBONE_FAMILIES[family][0]
    with pytest.raises(ConfigError, match=rf"frozen_bn=true .* {name} \({family} family\) has LayerNorm only"):
        load_config(None, [f"model.backbone.name={name}", "model.backbone.frozen_bn=true"])
    # Pretrained weights with a GroupNorm decoder need no frozen BatchNorm there.
    assert load_config(None, [f"model.backbone.name={name}", "model.norm=group", "model.backbone.weights=imagenet"])
