"""Training recipes of the transformer backbones (issue 21, item 3): optim.layer_decay, optim.no_decay_extra,
model.backbone.drop_path, model.backbone.checkpointing; the defaults keep today's groups and model.

Parameter groups are computed on models built on the meta device (no memory, no initialisation)."""

import pytest
import torch
from torchvision.models.convnext import LayerNorm2d
from torchvision.ops import StochasticDepth

from salnet.config import ConfigError, load_config
from salnet.model import build_model
from salnet.model.layers import NO_DECAY_NAMES
from salnet.optim import apply_settings, build_optimizer, build_schedule, param_groups

LR, MULT, WD = 1e-4, 0.1, 0.05


def config(name, *overrides):
    return load_config(
        None,
        [f"model.backbone.name={name}", f"optim.lr={LR}", f"optim.backbone_lr_mult={MULT}", f"optim.weight_decay={WD}"]
        + list(overrides),
    )


def meta_model(cfg):
    with torch.device("meta"):
        return build_model(cfg.model)


def settings(model, groups):
    """{parameter name: (lr, weight decay)} of every trainable parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def head_param_groups(model, cfg):
    """salnet.optim.param_groups as it was before the recipes (HEAD 55a165c), verbatim in substance."""
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    groups = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if id(p) in backbone_ids else "decoder"
        decay = "no_decay" if p.ndim < 2 else "decay"
        lr = cfg.lr * (cfg.backbone_lr_mult if part == "backbone" else 1.0)
        wd = cfg.weight_decay if decay == "decay" else 0.0
        groups.setdefault((part, decay), {"name": f"{part}/{decay}", "params": [], "lr": lr, "weight_decay": wd})
        groups[(part, decay)]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


@pytest.mark.parametrize(
    "name, overrides",
    [("resnet18", []), ("resnet18", ["model.backbone.frozen_bn=true"]), ("swin_t", []), ("vit_b_16", [])],
)
def test_defaults_give_the_groups_of_before(name, overrides):
    cfg = config(name, *overrides)
    model = meta_model(cfg)
    ours, before = param_groups(model, cfg.optim), head_param_groups(model, cfg.optim)
    assert [g.keys() for g in ours] == [g.keys() for g in before]  # no new keys in a group
    for a, b in zip(ours, before, strict=True):
        assert (a["name"], a["lr"], a["weight_decay"]) == (b["name"], b["lr"], b["weight_decay"])
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]  # same parameters, same order
    # layer_decay 1.0 is off too
    same = param_groups(model, config(name, *overrides, "optim.layer_decay=1.0").optim)
    assert [(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in same] == [
        (g["name"], g["lr"], [id(p) for p in g["params"]]) for g in before
    ]


def test_default_model_is_the_same():
    """drop_path null and checkpointing false build today's model: the same weights for the same seed."""
    cfg = config("resnet18")
    torch.manual_seed(0)
    ours = build_model(cfg.model).state_dict()
    import salnet.model.backbone as backbone

    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d
    before = backbone.build_backbone("resnet18", "none", norm).state_dict()  # the call of before, positional
    assert all(torch.equal(ours[f"backbone.{k}"], v) for k, v in before.items())


# (backbone, {parameter: layer id}, top): the rule per family, spelled out for a few parameters
LAYERS = {
    "swin_t": (  # depths 2, 2, 6, 2: 12 blocks
        {
            "backbone.features.0.0.weight": 0,  # patch embedding
            "backbone.features.1.0.attn.qkv.weight": 1,
            "backbone.features.2.reduction.weight": 2,  # patch merging: the id of the block before it
            "backbone.features.3.0.attn.qkv.weight": 3,
            "backbone.features.7.1.mlp.3.weight": 12,
        },
        13,
    ),
    "convnext_tiny": (  # depths 3, 3, 9, 3: 18 blocks
        {
            "backbone.features.0.0.weight": 0,
            "backbone.features.1.2.block.0.weight": 3,
            "backbone.features.4.1.weight": 6,  # downsampling conv
            "backbone.features.5.8.block.3.weight": 15,
            "backbone.features.7.2.block.5.weight": 18,
        },
        19,
    ),
    "vit_b_16": (  # 12 encoder layers
        {
            "backbone.conv_proj.weight": 0,
            "backbone.class_token": 0,
            "backbone.encoder.pos_embedding": 0,
            "backbone.encoder.layers.encoder_layer_0.mlp.0.weight": 1,
            "backbone.encoder.layers.encoder_layer_11.self_attention.in_proj_weight": 12,
            "backbone.to_stride4.0.weight": 13,  # the new pyramid: the backbone's full lr
        },
        13,
    ),
    "resnet18": (
        {"backbone.conv1.weight": 0, "backbone.layer1.0.conv1.weight": 1, "backbone.layer4.1.conv2.weight": 8},
        9,
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_decay_scales_the_backbone_lr_by_depth(name):
    decay = 0.5
    cfg = config(name, f"optim.layer_decay={decay}")
    model = meta_model(cfg)
    lrs = settings(model, param_groups(model, cfg.optim))
    expected, top = LAYERS[name]
    for param, layer in expected.items():
        assert lrs[param][0] == pytest.approx(LR * MULT * decay ** (top - layer), rel=1e-12), param
    backbone = {n: lr for n, (lr, _) in lrs.items() if n.startswith("backbone.")}
    decoder = {n: lr for n, (lr, _) in lrs.items() if not n.startswith("backbone.")}
    assert set(decoder.values()) == {LR}  # the decoder at the full lr
    assert min(backbone.values()) == pytest.approx(LR * MULT * decay**top)  # the stem the smallest
    assert max(backbone.values()) <= LR * MULT * (1 + 1e-12)
    # monotone in depth: the named parameters come in model order
    ordered = [lrs[p][0] for p in expected]
    assert ordered == sorted(ordered)
    # weight decay is untouched by layer decay
    assert {wd for _, wd in lrs.values()} == {0.0, WD}


def test_layer_decay_survives_a_resume_with_a_changed_lr():
    cfg = config("swin_t", "optim.layer_decay=0.5")
    with torch.device("meta"):
        model = build_model(cfg.model)
    model = model.to_empty(device="cpu")
    optimizer = build_optimizer(model, cfg.optim)
    schedule = build_schedule(optimizer, cfg.optim, total_steps=10)
    changed = config("swin_t", "optim.layer_decay=0.5", "optim.lr=2e-4").optim
    apply_settings(schedule, changed)
    lrs = settings(model, optimizer.param_groups)
    assert lrs["backbone.features.0.0.weight"][0] == pytest.approx(2e-4 * MULT * 0.5**13)
    assert all(lr == pytest.approx(2e-4) for n, (lr, _) in lrs.items() if not n.startswith("backbone."))


EXEMPT = {
    "vit_b_16": {
        "position": ["backbone.encoder.pos_embedding"],
        "class_token": ["backbone.class_token"],
    },
    "swin_t": {"position": ["backbone.features.1.0.attn.relative_position_bias_table"]},
    "swin_v2_t": {
        "position": ["backbone.features.1.0.attn.logit_scale", "backbone.features.1.0.attn.cpb_mlp.0.weight"]
    },
    "convnext_tiny": {"layer_scale": ["backbone.features.1.0.layer_scale"]},
}


@pytest.mark.parametrize("name", list(EXEMPT))
def test_no_decay_extra(name):
    default = config(name)
    model = meta_model(default)
    before = settings(model, param_groups(model, default.optim))
    for kind, params in EXEMPT[name].items():
        assert all(before[p][1] == WD for p in params)  # decayed by default (they have 2+ dims), as before
        cfg = config(name, f"optim.no_decay_extra=[{kind}]")
        after = settings(model, param_groups(model, cfg.optim))
        assert all(after[p] == (before[p][0], 0.0) for p in params)
        moved = {n for n in after if after[n] != before[n]}
        assert set(params) <= moved
        assert all(any(p.strip(".") in n for p in NO_DECAY_NAMES[kind]) for n in moved)  # nothing else moved
    # norm weights and biases: never decayed, with or without the key
    everything = config(name, "optim.no_decay_extra=[position,class_token,layer_scale]")
    after = settings(model, param_groups(model, everything.optim))
    norms = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm | LayerNorm2d)]
    biases = [n for n in before if n.endswith("bias")]
    assert norms and biases and all(before[n][1] == after[n][1] == 0.0 for n in norms + biases)


@pytest.mark.parametrize("name, default_last", [("swin_t", 0.2), ("convnext_tiny", 0.1)])
def test_drop_path_reaches_the_model(name, default_last):
    def rates(cfg):
        return [m.p for m in meta_model(cfg).modules() if isinstance(m, StochasticDepth)]

    default = rates(config(name))
    assert default[-1] == pytest.approx(default_last) and default[0] == 0.0  # torchvision's, as before
    set_ = rates(config(name, "model.backbone.drop_path=0.3"))
    assert set_[-1] == pytest.approx(0.3) and set_ == sorted(set_) and len(set_) == len(default)


def one_step_gradients(model, image, target, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    outputs = model(image)
    loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(o, target) for o in outputs)
    loss.backward()
    after = torch.rand(1)  # the RNG stream after the step
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, after


@pytest.mark.parametrize("name, overrides", [("swin_t", ["model.backbone.drop_path=0.5"]), ("vit_b_16", [])])
def test_checkpointing_gives_the_same_loss_and_gradients(name, overrides, monkeypatch):
    cfg = config(name, "model.fpn_width=32", "model.ppm_width=32", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    image, target = torch.randn(2, 3, 64, 64), torch.rand(2, 1, 64, 64)
    plain = one_step_gradients(model, image, target, seed=1)

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.backbone.checkpointing = True
    checkpointed = one_step_gradients(model, image, target, seed=1)
    assert len(calls) == 12  # one per block: swin_t 2+2+6+2, vit_b_16's 12 encoder layers
    assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[2], checkpointed[2])
    assert plain[1].keys() == checkpointed[1].keys()
    for k in plain[1]:
        torch.testing.assert_close(checkpointed[1][k], plain[1][k], rtol=0, atol=0, msg=k)
    # eval mode and no-grad forward passes are not checkpointed
    calls.clear()
    with torch.no_grad():
        model(image)
    model.eval()(image)
    assert not calls


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.backbone.name=resnet50", "model.backbone.drop_path=0.1"], ["model.backbone.drop_path", "swin"]),
        (["model.backbone.name=vit_b_16", "model.backbone.drop_path=0.1"], ["model.backbone.drop_path", "ViT"]),
        (["model.backbone.name=resnet50", "model.backbone.checkpointing=true"], ["model.backbone.checkpointing"]),
        (["optim.layer_decay=0"], ["optim.layer_decay"]),
        (["optim.layer_decay=1.5"], ["optim.layer_decay"]),
        (["optim.no_decay_extra=[bias]"], ["optim.no_decay_extra"]),
    ],
)
def test_config_errors_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert all(w in str(err.value) for w in words), str(err.value)
