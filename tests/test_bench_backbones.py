"""The backbone table (`python -m salnet.bench backbones`) at toy sizes, and the shipped recipes of the
transformer backbones (issue 21, item 5): they load, validate and build (on the meta device: no weights)."""

import pytest

from salnet.bench import backbones
from salnet.config import load_config
from salnet.model.cost import meta_model
from salnet.optim import param_groups

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest says why


def test_table_counts_every_backbone_and_times_those_within_the_limit():
    args = backbones.parse(
        [
            "--backbone",
            "resnet18",
            "--backbone",
            "resnet34",
            "--size",
            "32",
            "--repeats",
            "1",
            "--time-max-mparams",
            "20",
        ]
    )
    result = backbones.measure(args)
    rows = result["rows"]
    resnet18, resnet34 = rows["resnet18"], rows["resnet34"]
    assert 13 < resnet18["params_m"] < 15 and 23 < resnet34["params_m"] < 25  # backbone + decoder at width 256
    assert 0 < resnet18["gflops_352"] < resnet18["gflops_384"] < resnet34["gflops_384"]
    assert resnet18["weights"] == ["IMAGENET1K_V1"]  # DEFAULT, an alias of it, is not a file of its own
    assert resnet18["timed"] and resnet18["ms_per_img"] > 0 and resnet18["vs_resnet50"] > 0
    assert not resnet34["timed"] and "ms_per_img" not in resnet34  # 24 M parameters > 20
    assert result["baseline_ms_per_img"] > 0
    table = backbones.markdown(rows, args)
    assert "| resnet34 | 24.0 |" in table and "| not timed (> 20 M params) |" in table


def test_an_unknown_backbone_stops_the_table_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        backbones.parse(["--backbone", "swin_x"])
    assert "not a known backbone" in capsys.readouterr().err


RECIPES = {
    "duts_swinb_384.yaml": "swin_b",
    "duts_convnext_b.yaml": "convnext_base",
    "duts_pvtv2_b2.yaml": "timm/pvt_v2_b2",
}


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_config_loads_and_its_network_builds(path):
    cfg = load_config(str(REPO / "configs" / path))
    assert cfg.model.backbone.name == RECIPES[path] and cfg.model.backbone.weights == "imagenet"
    if cfg.model.backbone.name.startswith("timm/"):
        pytest.importorskip("timm")
    model = meta_model(cfg.model)
    rates = {group["lr"] for group in param_groups(model, cfg.optim)}
    if cfg.optim.layer_decay:  # ConvNeXt-B: 0.9 per block, from the decoder's lr down to the stem's
        assert max(rates) == cfg.optim.lr and min(rates) < cfg.optim.lr * 0.9**30
    else:
        assert rates == {cfg.optim.lr}
