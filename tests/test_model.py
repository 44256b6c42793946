"""salnet.model: shapes at any input size, PPM/FPN, gradients, norms, compile, weights, overfitting, report."""

import logging

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from salnet.config import ConfigError, LossConfig, ModelConfig, load_config
from salnet.loss import build_loss
from salnet.model import BackboneWeightsError, build_model
from salnet.model.backbone import build_backbone, stage_channels
from salnet.model.fpn import FeaturePyramid
from salnet.model.ppm import PyramidPooling

from conftest import run_py

# resnet18 with narrow decoder widths keeps every test cheap on two CPU cores.
SMALL = {"ppm_width": 32, "fpn_width": 32, "ppm_branch_width": 16}
# torchvision's ImageNet file for resnet18, as named in its URL.
RESNET18_FILE = "resnet18-f37072fd.pth"


def small_config(backbone=None, **model):
    return ModelConfig.model_validate({**SMALL, **model, "backbone": {"name": "resnet18", **(backbone or {})}})


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest says why


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(small_config())


def random_resnet18_state(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def assert_backbone_holds(model, state):
    """Every backbone tensor equals the one of the same name in `state` (a torchvision state dict)."""
    backbone = model.backbone.state_dict()
    assert backbone, "backbone has no state"
    for key, value in backbone.items():
        assert torch.equal(value, state[key]), key


# -- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(64, 64), (65, 97), (131, 64), (224, 160), (352, 352), (400, 301)])
def test_outputs_are_logits_at_the_input_size(small_model, height, width):
    with torch.no_grad():
        small_model.eval()
        fused = small_model(torch.randn(1, 3, height, width))
        small_model.train()
        outputs = small_model(torch.randn(2, 3, height, width))
    assert fused.shape == (1, 1, height, width)
    assert isinstance(outputs, list) and len(outputs) == 5  # fused, side P2..P5
    assert all(o.shape == (2, 1, height, width) for o in outputs)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d"])
def test_stage_channels_match_torchvision(name):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        backbone = build_backbone(name, "none", nn.BatchNorm2d)
        features = backbone(torch.empty(1, 3, 64, 64))
    assert [features[k].shape[1] for k in ("c2", "c3", "c4", "c5")] == stage_channels(name)


def test_ppm_keeps_the_size_sets_the_width_and_sees_the_whole_map():
    ppm = PyramidPooling(64, 24, bins=[1, 2, 3, 6], branch_channels=8, norm_layer=nn.BatchNorm2d).eval()
    assert ppm.project[0].in_channels == 64 + 4 * 8  # C5 concatenated with the four branches
    x = torch.randn(2, 64, 3, 5)
    out = ppm(x)
    assert out.shape == (2, 24, 3, 5)
    # Pooled context: a change in one corner reaches the opposite corner (1x1 convs alone would not).
    changed = x.clone()
    changed[:, :, 0, 0] += 5
    assert not torch.allclose(ppm(changed)[:, :, -1, -1], out[:, :, -1, -1])


def test_fpn_levels_take_each_lateral_size_and_the_common_width():
    fpn = FeaturePyramid([16, 24, 40], top_channels=48, width=32, norm_layer=nn.BatchNorm2d).eval()
    c2, c3, c4 = torch.randn(2, 16, 17, 23), torch.randn(2, 24, 9, 12), torch.randn(2, 40, 5, 6)
    top = torch.randn(2, 48, 3, 3)
    pyramid = fpn([c2, c3, c4], top)
    assert [tuple(p.shape) for p in pyramid] == [(2, 32, 17, 23), (2, 32, 9, 12), (2, 32, 5, 6), (2, 32, 3, 3)]
    # Top-down: the top level reaches P2.
    assert not torch.allclose(fpn([c2, c3, c4], top + 1)[0], pyramid[0])
    assert isinstance(FeaturePyramid([16], top_channels=32, width=32, norm_layer=nn.BatchNorm2d).top, nn.Identity)


# -- training behaviour ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"fuse": "concat", "norm": "batch"},
        {"fuse": "sum", "norm": "group", "gn_groups": 8, "backbone": {"frozen_bn": True}},
    ],
    ids=["concat-batchnorm", "sum-groupnorm-frozenbn"],
)
def test_every_parameter_receives_a_gradient(options):
    torch.manual_seed(0)
    model = build_model(small_config(**options)).train()
    outputs = model(torch.randn(2, 3, 64, 80))
    total, _ = build_loss(LossConfig())(outputs, (torch.rand(2, 1, 64, 80) > 0.5).float())
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without a gradient: {no_grad}"


def test_frozen_bn_backbone_keeps_its_statistics_and_has_no_batchnorm():
    model = build_model(small_config(backbone={"frozen_bn": True})).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    frozen = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 20  # resnet18: stem + 2 per block x 8 blocks + 3 downsamples
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.fpn.modules())  # the decoder still adapts


def test_sync_batchnorm_conversion_keeps_the_network(small_model):
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model(small_config())).eval()
    converted.load_state_dict(small_model.state_dict())
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in small_model.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == batchnorms > 20
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(converted(x), small_model.eval()(x), atol=1e-5)


def test_channels_last_gives_the_same_output_and_compiles_without_graph_breaks(small_model):
    model = build_model(small_config())
    model.load_state_dict(small_model.state_dict())
    model = model.to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        assert torch.allclose(model(x.to(memory_format=torch.channels_last)), small_model.eval()(x), atol=1e-4)
    for training in (True, False):
        model.train(training)
        explanation = torch._dynamo.explain(model)(x.to(memory_format=torch.channels_last))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.slow
def test_overfits_eight_synthetic_samples():
    """From random init, 60 Adam steps (lr 3e-3, batch 8) bring the fused eval loss from > 0.8 to < 0.3."""
    g = torch.Generator().manual_seed(0)
    size = 64
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for i in range(8):  # a rectangle or an ellipse of one colour on another, plus noise
        cy, cx = torch.randint(16, size - 16, (2,), generator=g)
        ry, rx = torch.randint(6, 16, (2,), generator=g)
        inside = (
            (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
            if i % 2
            else (((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx))
        )
        mask = inside.float()
        fg, bg = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        images.append(bg + (fg - bg) * mask + 0.1 * torch.randn(3, size, size, generator=g))
        masks.append(mask[None])
    x, target = (torch.stack(images) - 0.5) / 0.25, torch.stack(masks)

    torch.manual_seed(0)
    model = build_model(small_config(ppm_width=64, fpn_width=64, ppm_branch_width=None))
    loss = build_loss(LossConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def fused_eval_loss():
        with torch.no_grad():
            return loss(model.eval()(x), target)[0].item()

    start = fused_eval_loss()
    for _ in range(60):
        total, _ = loss(model.train()(x), target)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    end = fused_eval_loss()
    assert start > 0.8, f"the untrained loss is already {start:.3f}: the task is too easy to show learning"
    assert end < 0.3, f"fused loss {start:.3f} -> {end:.3f} after 60 steps; expected < 0.3"


# -- weights ---------------------------------------------------------------------------------


def test_torchvision_state_dict_file_loads_into_the_backbone(tmp_path, caplog):
    state = random_resnet18_state()
    path = tmp_path / "r18.pth"
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with caplog.at_level(logging.WARNING, logger="salnet.model.weights"):
        model = build_model(small_config(backbone={"weights": str(path)}))
    assert_backbone_holds(model, state)
    assert "1 unexpected keys" in caplog.text and "extra.weight" in caplog.text

    del state["layer4.1.bn2.weight"]
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match=r"lacks 1 of resnet18's tensors.*layer4\.1\.bn2\.weight"):
        build_model(small_config(backbone={"weights": str(path)}))

    torch.save({f"module.{k}": v for k, v in random_resnet18_state().items()}, path)  # saved from a DDP wrapper
    # 100 = all of resnet18's tensors but fc's 2 and the 20 BatchNorm counters, which torch fills in itself
    with pytest.raises(
        BackboneWeightsError, match=r"lacks 100 of resnet18's tensors.*its unexpected keys: module\.conv1\.weight"
    ):
        build_model(small_config(backbone={"weights": str(path)}))

    torch.save({"model": random_resnet18_state()}, path)  # a training checkpoint, not a state dict
    with pytest.raises(BackboneWeightsError, match="holds a dict, not a state dict"):
        build_model(small_config(backbone={"weights": str(path)}))

    with pytest.raises(
        BackboneWeightsError, match=r"'imagenett' is not a file; valid values: 'imagenet', 'none', .*IMAGENET1K_V1"
    ):
        build_model(small_config(backbone={"weights": "imagenett"}))


def test_imagenet_weights_load_from_the_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = random_resnet18_state(seed=3)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / RESNET18_FILE)
    model = build_model(small_config(backbone={"weights": "imagenet", "frozen_bn": True}))
    assert_backbone_holds(model, state)  # frozen BatchNorm too: its buffers carry the file's statistics


def test_missing_imagenet_weights_stop_with_the_file_its_place_and_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # A proxy on a closed local port makes the download fail at once, with or without network.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "")
    expected = tmp_path / "hub" / "checkpoints" / RESNET18_FILE
    with pytest.raises(BackboneWeightsError) as error:
        build_model(small_config(backbone={"weights": "imagenet"}))
    message = str(error.value)
    assert "are not cached and could not be downloaded" in message
    assert f"expected file: {expected}\n" in message
    assert f"curl -fL --create-dirs -o {expected} https://download.pytorch.org/models/{RESNET18_FILE}" in message
    assert "model.backbone.weights=none" in message
    assert not expected.parent.exists() or not any(expected.parent.iterdir())  # nothing half-written


def test_config_combinations_that_cannot_work_are_rejected_by_key():
    # Checked by the schema at load time, before torch is imported:
    with pytest.raises(
        ConfigError, match=r"model.norm=group .* model.backbone.weights='imagenet'.*model.backbone.frozen_bn=true"
    ):
        load_config(None, ["model.norm=group", "model.backbone.weights=imagenet"])
    with pytest.raises(ConfigError, match=r"model.ppm_bins must all be >= 1 .*got \[0, 2\]"):
        load_config(None, ["model.ppm_bins=[0, 2]"])
    with pytest.raises(
        ConfigError,
        match=r"model.gn_groups=24 must divide .*model.ppm_width=32, model.fpn_width=32, model.ppm_branch_width=16",
    ):
        load_config(None, ["model.norm=group", "model.gn_groups=24", *(f"model.{k}={v}" for k, v in SMALL.items())])
    # Checked by build_model, which knows the backbone's channels (the PPM branch is C5 // 4 by default):
    with pytest.raises(
        ConfigError,
        match=r"model.gn_groups=96 must divide .*model.ppm_branch_width=128, resnet18's channels \(multiples of 64\)=64",
    ):
        build_model(small_config(norm="group", gn_groups=96, ppm_width=96, fpn_width=96, ppm_branch_width=None))
    grouped = build_model(small_config(norm="group", gn_groups=16))
    assert any(
        isinstance(m, nn.GroupNorm) for m in grouped.backbone.modules()
    )  # not frozen: the backbone is grouped too
    assert not any(isinstance(m, nn.BatchNorm2d) for m in grouped.modules())


# -- report ----------------------------------------------------------------------------------


def test_model_report_prints_parameters_flops_and_shapes():
    proc = run_py(
        ["-m", "salnet.model", "--backbone", "resnet18", "--size", "65x97", "model.ppm_width=32", "model.fpn_width=32"]
    )
    out = proc.stdout
    params = sum(p.numel() for p in build_model(small_config(ppm_branch_width=None)).parameters())
    assert f"parameters: {params / 1e6:.2f} M ({params:,})" in out
    gflops = float(out.split(" GFLOPs")[0].rsplit(" ", 1)[-1])
    assert 0.3 < gflops < 3, out  # resnet18 alone is ~1.8 GFLOPs at 224x224: ~0.23 at 65x97, plus the decoder
    # 65x97 -> stem 33x49 -> C2 17x25 -> C3 9x13 -> C4 5x7 -> C5 3x4
    for line in [
        "C2              [64, 17, 25]",
        "C5              [512, 3, 4]",
        "PPM             [32, 3, 4]",
        "P2              [32, 17, 25]",
        "P5              [32, 3, 4]",
        "output (eval)   [1, 65, 97]",
        "side_P5 [1, 65, 97]",
    ]:
        assert line in out, f"{line!r} not in the report:\n{out}"
