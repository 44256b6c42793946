"""salnet.model's backbone families (Swin, Swin V2, ConvNeXt, ViT beside ResNet): C2..C5, any input size,
gradients, the unknown-name error, ViT position embeddings from a file, ResNets bitwise as before."""

import hashlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from salnet.config import BACKBONE_FAMILIES, ConfigError, LossConfig, ModelConfig, load_config
from salnet.loss import build_loss
from salnet.model import build_model
from salnet.model.__main__ import main as model_report
from salnet.model.backbone import backbone_shape, build_backbone
from salnet.model.vit_pyramid import ViTPyramid, resize_position_grid
from salnet.model.weights import cache_path, torchvision_weights

# Narrow decoder widths (as in test_model) keep every test cheap on two CPU cores.
SMALL = {"ppm_width": 32, "fpn_width": 32, "ppm_branch_width": 16}

# One small member of each new family; their _s/_b/_l/_h siblings differ only in widths and depths
# (the dry pass covers every name).
FAMILY_CASES = ["swin_t", "swin_v2_t", "convnext_tiny", "vit_b_16"]
EVERY_NAME = [name for names in BACKBONE_FAMILIES.values() for name in names]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest says why


def config(name, backbone=None):
    return ModelConfig.model_validate({**SMALL, "backbone": {"name": name, **(backbone or {})}})


_models: dict[str, nn.Module] = {}


def small_model(name):
    """build_model(name) with narrow decoder widths, built once per module (random init, seed 0)."""
    if name not in _models:
        torch.manual_seed(0)
        _models[name] = build_model(config(name))
    return _models[name]


# -- C2..C5 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EVERY_NAME)
def test_dry_pass_reads_four_levels_at_strides_4_to_32_off_every_backbone(name):
    shape = backbone_shape(name)
    assert shape.strides == (4, 8, 16, 32)
    assert len(shape.channels) == 4 and all(c > 0 for c in shape.channels)


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_backbone_gives_c2_to_c5_at_strides_4_to_32_with_the_dry_pass_channels(name):
    backbone = small_model(name).backbone.eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    assert list(features) == ["c2", "c3", "c4", "c5"]
    channels = backbone_shape(name).channels
    assert [tuple(f.shape) for f in features.values()] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32))
    ]
    # LayerNorm families keep their norm: model.norm reaches a ResNet backbone only.
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in backbone.modules())


@pytest.mark.parametrize("name", FAMILY_CASES)
@pytest.mark.parametrize("height, width", [(64, 64), (72, 88)])
def test_logits_have_the_input_size_also_off_multiples_of_32(name, height, width):
    model = small_model(name).eval()
    with torch.no_grad():
        fused = model(torch.randn(1, 3, height, width))
        c = model.backbone(torch.randn(1, 3, height, width))
    assert fused.shape == (1, 1, height, width) and torch.isfinite(fused).all()
    # Padded to a multiple of 32 inside the seam, cropped back: C_s covers ceil(input / s), as a ResNet's does.
    assert [tuple(f.shape[-2:]) for f in c.values()] == [(-(-height // s), -(-width // s)) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_backward_gives_every_parameter_a_finite_gradient(name):
    model = small_model(name).train()
    model.zero_grad()
    outputs = model(torch.randn(2, 3, 64, 64))
    assert len(outputs) == 5 and all(o.shape == (2, 1, 64, 64) for o in outputs)
    total, _ = build_loss(LossConfig())(outputs, (torch.rand(2, 1, 64, 64) > 0.5).float())
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    not_finite = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not not_finite, f"non-finite gradients: {not_finite}"


# -- names -----------------------------------------------------------------------------------


def test_unknown_backbone_name_lists_the_families_and_how_to_see_every_name(capsys):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.backbone.name=swin_tt"])
    message = str(error.value)
    assert "model.backbone.name='swin_tt' is not a known backbone; did you mean 'swin_t'?" in message
    assert "Families: resnet (resnet18, ...), swin (swin_t, ...), swin_v2 (swin_v2_t, ...)" in message
    assert "convnext (convnext_tiny, ...), vit (vit_b_16, ...)" in message
    assert "`python -m salnet.model --backbones` lists every name" in message

    model_report(["--backbones"])
    listed = capsys.readouterr().out.split()
    assert set(EVERY_NAME) <= set(listed)

    # frozen_bn freezes BatchNorm, which the LayerNorm families do not have.
    with pytest.raises(ConfigError, match=r"frozen_bn=true .* swin_t \(swin family\) has LayerNorm only"):
        load_config(None, ["model.backbone.name=swin_t", "model.backbone.frozen_bn=true"])
    # model.norm=group is the decoder's alone there, so pretrained weights need no frozen BatchNorm.
    assert load_config(None, ["model.backbone.name=swin_t", "model.norm=group", "model.backbone.weights=imagenet"])


# -- ViT position embeddings -----------------------------------------------------------------


def test_vit_position_embeddings_of_another_image_size_load_interpolated(tmp_path):
    torch.manual_seed(1)
    vit = torchvision.models.vit_b_16()  # built at 224 px: a 14 x 14 grid
    state = vit.state_dict()
    # As if saved from a vit_b_16 built at 384 px: a 24 x 24 grid (the only tensor that differs).
    saved = torch.randn(1, 1 + 24 * 24, 768)
    path = tmp_path / "vit384.pth"
    torch.save({**state, "encoder.pos_embedding": saved}, path)

    model = build_model(config("vit_b_16", backbone={"weights": str(path)}))
    loaded = model.backbone.encoder.pos_embedding
    grid = saved[:, 1:].reshape(1, 24, 24, 768).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    assert loaded.shape == (1, 1 + 14 * 14, 768)
    assert torch.equal(loaded[:, :1], saved[:, :1])  # the class token's embedding is not resized
    assert torch.allclose(loaded[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 196, 768))
    assert torch.equal(model.backbone.conv_proj.weight, state["conv_proj.weight"])
    # At forward time the embeddings follow the input's patch grid (72 x 88 -> padded 96 x 96 -> 6 x 6).
    at_input = resize_position_grid(loaded, 6, 6)
    grid = loaded[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(at_input[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, 768))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 72, 88)).shape == (1, 1, 72, 88)


def test_imagenet_weights_of_every_family_are_torchvisions_files_in_the_torch_home_cache(tmp_path, monkeypatch):
    # The path test_model checks for resnet18 (cached file, else the exact file and its fetch command), by URL name.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    for name, file in [
        ("swin_t", "swin_t-704ceda3.pth"),
        ("swin_v2_t", "swin_v2_t-b137f0e2.pth"),
        ("convnext_tiny", "convnext_tiny-983f1562.pth"),
        ("vit_b_16", "vit_b_16-c867db91.pth"),
        ("vit_h_14", "vit_h_14_swag-80465313.pth"),  # no IMAGENET1K_V1: torchvision's DEFAULT
    ]:
        assert cache_path(torchvision_weights(name, "imagenet")) == checkpoints / file
    # vit_h_14's position-embedding grid is that of its 518 px file, so the file loads as it is.
    with torch.device("meta"):
        assert build_backbone("vit_h_14", "none", nn.BatchNorm2d).encoder.pos_embedding.shape == (1, 1 + 37 * 37, 1280)


def test_vit_with_14_px_patches_keeps_its_tokens_at_stride_16():
    # vit_h_14's seam on a one-layer ViT of the same patch size: the padded image is resized by 14/16.
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=56, patch_size=14, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    with torch.no_grad():
        c = ViTPyramid(vit).eval()(torch.randn(1, 3, 72, 88))
    assert [tuple(f.shape[1:]) for f in c.values()] == [(8, 18, 22), (16, 9, 11), (32, 5, 6), (32, 3, 3)]


# -- ResNets as before -----------------------------------------------------------------------

# sha256 (first 16 hex digits) of every state-dict key, shape, dtype and value of build_model(seed 0),
# then of torch.rand(4) after it (the random numbers the build drew), computed with the code before
# the backbone families (commit 59f231d) and equal after.
RESNET_DIGESTS = {
    ("resnet18", "batch"): "25b906f14a7e7298",
    ("resnet18", "group"): "838a432fb81d15b8",
    ("resnet50", "batch"): "993590e00c418d37",
}


def init_digest(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    h.update(torch.rand(4).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name, norm", list(RESNET_DIGESTS))
def test_resnet_models_are_bitwise_those_of_before_the_families(name, norm):
    group = {"norm": "group", "ppm_width": 64, "fpn_width": 64, "ppm_branch_width": 32, "gn_groups": 16}
    cfg = ModelConfig.model_validate({**(group if norm == "group" else {}), "backbone": {"name": name}})
    assert init_digest(cfg) == RESNET_DIGESTS[name, norm]
