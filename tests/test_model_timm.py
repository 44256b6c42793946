"""timm backbones (issue 21, item 2): model.backbone.name timm/<model>, its weights from a local file or timm's
local cache only, the errors that say what is missing, and a 2-rank CPU training run."""

import json

import pytest
import safetensors.torch
import timm
import torch
import yaml

from salnet.config import ConfigError, ModelConfig, OptimConfig
from salnet.model import BackboneWeightsError, build_model
from salnet.model.backbone import backbone_shape, build_backbone
from salnet.model.layers import no_decay_kind
from salnet.optim import param_groups
from salnet.run.checkpoint import load_best
from salnet.run.rundir import RunDir
from salnet.shards.synth import synthesize

from conftest import ranks, run_py

NAME = "timm/pvt_v2_b0"
REPO_ID = "timm/pvt_v2_b0.in1k"  # timm's default tag of pvt_v2_b0, and its Hugging Face repository


def small_model(**backbone) -> ModelConfig:
    return ModelConfig(backbone={"name": NAME, **backbone}, ppm_width=32, fpn_width=32)


def timm_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A random-init pvt_v2_b0's full state dict, in timm's key names (classifier included)."""
    torch.manual_seed(seed)
    return timm.create_model("pvt_v2_b0").state_dict()


def test_pvt_v2_b0_gives_c2_to_c5_at_strides_4_to_32_and_trains():
    assert backbone_shape(NAME).channels == (32, 64, 160, 256)
    torch.manual_seed(0)
    model = build_model(small_model())
    features = model.backbone(torch.randn(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "c2": (2, 32, 16, 24),
        "c3": (2, 64, 8, 12),
        "c4": (2, 160, 4, 6),
        "c5": (2, 256, 2, 3),
    }
    # a size that is no multiple of 32: each level covers the whole image, as a ResNet's would
    assert [tuple(v.shape[-2:]) for v in model.backbone(torch.randn(1, 3, 65, 97)).values()] == [
        (17, 25),
        (9, 13),
        (5, 7),
        (3, 4),
    ]
    outputs = model(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in outputs).backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_swin_levels_come_back_channels_first_at_any_input_size():
    name = "timm/swin_tiny_patch4_window7_224"  # timm's Swin gives (N, H, W, C) levels, at 224 px unless asked
    shape = backbone_shape(name)
    assert shape.channels == (96, 192, 384, 768) and shape.strides == (4, 8, 16, 32)
    with torch.device("meta"):
        features = build_backbone(name, "none", torch.nn.BatchNorm2d)(torch.empty(1, 3, 64, 96))
    assert [tuple(f.shape) for f in features.values()] == [
        (1, 96, 16, 24),
        (1, 192, 8, 12),
        (1, 384, 4, 6),
        (1, 768, 2, 3),
    ]


def test_a_model_without_four_levels_at_strides_4_to_32_and_an_unknown_name_say_why():
    with pytest.raises(ConfigError, match=r"strides \[16, 16, 16.*needs one at each of \[4, 8, 16, 32\]"):
        backbone_shape("timm/vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match=r"has no model 'pvt_v2_b9'; did you mean timm/pvt_v2_b"):
        build_model(small_model(name="timm/pvt_v2_b9"))
    with pytest.raises(
        ValueError, match=r"frozen_bn=true .* \(timm family\) keeps its norm layers as timm builds them"
    ):
        small_model(frozen_bn=True)


def test_weights_from_a_safetensors_or_torch_file_in_timm_key_names(tmp_path):
    state = timm_state_dict(1)
    path = tmp_path / "pvt.safetensors"
    safetensors.torch.save_file(state, path)
    backbone = build_backbone(NAME, str(path), torch.nn.BatchNorm2d)
    # timm's feature wrapper renames stages.0 to stages_0; the file's tensors land there
    loaded = backbone.state_dict()
    assert torch.equal(loaded["features.stages_0.blocks.0.attn.q.weight"], state["stages.0.blocks.0.attn.q.weight"])
    assert torch.equal(loaded["features.patch_embed.proj.weight"], state["patch_embed.proj.weight"])

    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "pvt.pt")
    backbone = build_backbone(NAME, str(tmp_path / "pvt.pt"), torch.nn.BatchNorm2d)
    assert torch.equal(backbone.state_dict()["features.stages_3.norm.bias"], state["stages.3.norm.bias"])

    del state["stages.3.norm.bias"]
    safetensors.torch.save_file(state, path)
    with pytest.raises(BackboneWeightsError, match=rf"{path} lacks 1 of {NAME}'s tensors.*stages_3\.norm\.bias"):
        build_backbone(NAME, str(path), torch.nn.BatchNorm2d)
    with pytest.raises(BackboneWeightsError, match=r"'imagenett' is not a file; valid values for timm/pvt_v2_b0"):
        build_backbone(NAME, "imagenett", torch.nn.BatchNorm2d)


def test_a_torchvision_backbone_takes_a_safetensors_file_too(tmp_path):
    torch.manual_seed(2)
    state = build_backbone("resnet18", "none", torch.nn.BatchNorm2d).state_dict()
    safetensors.torch.save_file(state, tmp_path / "r18.safetensors")
    loaded = build_backbone("resnet18", str(tmp_path / "r18.safetensors"), torch.nn.BatchNorm2d).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BackboneWeightsError, match=r"cannot read .*broken\.safetensors as safetensors"):
        build_backbone("resnet18", str(tmp_path / "broken.safetensors"), torch.nn.BatchNorm2d)


def fake_hub_cache(root, state=None):
    """A Hugging Face cache at `root` as `hf download` lays it out, holding timm's file of pvt_v2_b0 if `state`."""
    repo = root / f"models--{REPO_ID.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    if state is not None:
        safetensors.torch.save_file(state, repo / "snapshots" / revision / "model.safetensors")
    return root


def never_download(*args, **kwargs):
    raise AssertionError("timm went to the network")


def test_imagenet_weights_come_from_the_local_timm_cache_only(tmp_path, monkeypatch):
    import huggingface_hub

    state = timm_state_dict(3)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path, state)))
    for name in ("load_state_dict_from_hf", "load_state_dict_from_url"):
        monkeypatch.setattr(timm.models._builder, name, never_download)
    backbone = build_backbone(NAME, "imagenet", torch.nn.BatchNorm2d)
    assert torch.equal(
        backbone.state_dict()["features.stages_1.blocks.1.mlp.fc1.weight"], state["stages.1.blocks.1.mlp.fc1.weight"]
    )


def test_a_missing_pretrained_file_stops_with_its_name_and_the_fetch_command(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path)))
    with pytest.raises(BackboneWeightsError) as error:
        build_model(small_model(weights="imagenet"))
    message = str(error.value)
    assert f"{NAME}'s pretrained file {REPO_ID}/model.safetensors is not in the local Hugging Face cache" in message
    assert f"hf download {REPO_ID} model.safetensors --cache-dir {tmp_path}" in message
    assert "model.backbone.weights=none" in message


def test_without_timm_installed_a_timm_name_names_the_package():
    # A real failing import: None in sys.modules makes `import timm` raise ImportError, as where it is not installed.
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "import salnet.train, salnet.model  # salnet without timm: everything imports\n"
        "from salnet.config import ConfigError, ModelConfig\n"
        "try:\n"
        "    salnet.model.build_model(ModelConfig(backbone={'name': 'timm/pvt_v2_b0'}))\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = run_py(["-c", code]).stdout
    assert "timm backbones need the timm package, an optional extra of salnet: pip install 'salnet[timm]'" in out


def test_drop_path_checkpointing_and_layer_decay_reach_the_timm_model():
    torch.manual_seed(4)
    plain = build_model(small_model())
    torch.manual_seed(4)
    recomputed = build_model(small_model(checkpointing=True))
    images = torch.randn(2, 3, 64, 64)
    for model in (plain, recomputed):
        sum(o.mean() for o in model(images)).backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name

    rates = [m.drop_prob for m in build_model(small_model(drop_path=0.2)).modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="resnet10t has BatchNorm.*set model.backbone.checkpointing=false"):
        build_backbone("timm/resnet10t", "none", torch.nn.BatchNorm2d, checkpointing=True)

    groups = param_groups(plain, OptimConfig(layer_decay=0.5))
    # timm's group_matcher of PVTv2: the patch embedding 0, then one id per stage; top (5) is the backbone's full lr
    scales = {g["name"].split("/")[-1]: g["lr_scale"] for g in groups if g["name"].startswith("backbone/decay/")}
    assert scales == {f"layer{i}": 0.5 ** (5 - i) for i in range(5)}
    assert no_decay_kind("backbone.features.pos_embed") == "position"
    assert no_decay_kind("backbone.features.stages_0.blocks.0.gamma") == "layer_scale"


@pytest.mark.slow
def test_two_ranks_train_validate_and_keep_best_with_a_timm_backbone(tmp_path):
    train, val = synthesize(tmp_path / "demo", train=16, val=8, size=64, seed=5)
    cfg = {
        "name": "timm",
        "out_dir": str(tmp_path / "runs"),
        "data": {
            "train": [str(train)],
            "val": [str(val)],
            "size": 64,
            "eval_size": 64,
            "batch_size": 4,
            "eval_batch_size": 4,
            "workers": 0,
        },
        "model": {"backbone": {"name": NAME}, "ppm_width": 32, "fpn_width": 32},
        "optim": {"lr": 1e-3, "backbone_lr_mult": 1.0},
        "train": {"steps": 2},
        "eval": {"every": 1},
        "checkpoint": {"every": 2},
        "log": {"every": 1, "plots": False},
    }
    path = tmp_path / "timm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ranks(2, ["-m", "salnet.train", "--config", path], timeout=300)
    run_dir = tmp_path / "runs" / "timm"
    vals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [1, 2] and all(v["val/images"] == 8 for v in vals)
    best = load_best(RunDir(run_dir).best)
    assert best["step"] == max(vals, key=lambda v: v["val/maxF"])["step"]
    assert any(k.startswith("backbone.features.stages_3.") for k in best["model"])
