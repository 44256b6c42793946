"""model.factory: the README's own network trains, resumes bitwise, predicts and exports; a network
that breaks salnet's contract stops the build naming the factory and what it returned."""

import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch
import yaml
from evaluation_data import ecssd_folder
from PIL import Image

from salnet.config import ConfigError, ModelConfig, load_config
from salnet.evaluation import export
from salnet.evaluation import predict as salnet_predict
from salnet.evaluation.common import EvaluationError, load_best_weights
from salnet.model import build_model, side_logits_in_training
from salnet.optim import param_groups
from salnet.run.checkpoint import load_best, save_best
from salnet.run.rundir import RunDir
from salnet.shards.synth import synthesize

from conftest import REPO, forked_run

FACTORY = "my_sod.tiny:build"
# Networks that break the contract, each in its own way (the README's network is the one that keeps it).
BROKEN = """
import torch
from torch import nn


class Half(nn.Module):  # logits at half the input size
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class ListInEval(Half):  # predict takes a tensor
    def forward(self, x):
        return [nn.functional.interpolate(self.conv(x), size=x.shape[-2:])]


def half(cfg):
    return Half()


def list_in_eval(cfg):
    return ListInEval()


def not_a_module(cfg):
    return lambda x: x


not_callable = 3
"""


def readme_network() -> str:
    """The example network of the README's 'Your own network' section, as its file."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("    # my_sod/tiny.py")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("    PYTHONPATH="))
    return textwrap.dedent("\n".join(lines[start:end]))


@pytest.fixture(scope="module")
def package_root(tmp_path_factory):
    """A directory holding the package my_sod (the README's network, and broken ones), on sys.path."""
    root = tmp_path_factory.mktemp("user_code")
    (root / "my_sod").mkdir()
    (root / "my_sod" / "tiny.py").write_text(readme_network())
    (root / "my_sod" / "broken.py").write_text(BROKEN)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield root


def test_the_readme_network_is_built_with_its_options_and_checked_without_a_trace(package_root):
    from my_sod.tiny import build

    cfg = ModelConfig(factory=FACTORY, options={"width": 8})
    torch.manual_seed(0)
    direct = build(cfg)
    after_direct = torch.get_rng_state()
    torch.manual_seed(0)
    model = build_model(cfg)
    # The check's dry batches drew nothing from the global RNG and left the BatchNorm statistics as they were.
    assert torch.equal(torch.get_rng_state(), after_direct)
    for (name, a), b in zip(direct.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert model.training and model.down[0].out_channels == 8
    assert side_logits_in_training(model) == 1
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 40, 56)).shape == (1, 1, 40, 56)
    # No backbone submodule: all of it trains at optim.lr, and backbone-only settings are refused.
    groups = param_groups(model, load_config(None).optim)
    assert [g["name"] for g in groups] == ["decoder/decay", "decoder/no_decay"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for setting in ("optim.backbone_lr_mult=0.5", "optim.layer_decay=0.8"):
        with pytest.raises(ConfigError, match=f"{setting} apply to a network's `backbone` submodule"):
            param_groups(model, load_config(None, [setting]).optim)


@pytest.mark.parametrize(
    "factory, message",
    [
        (
            "my_sod.broken:half",
            r"model.factory='my_sod.broken:half': in eval mode its network returned \(2, 1, 32, 48\) for a "
            r"\(2, 3, 64, 96\) image batch; salnet's contract: logits \[B, 1, H, W\] at the input size, here "
            r"\(2, 1, 64, 96\)",
        ),
        ("my_sod.broken:list_in_eval", r"in eval mode its network returned \[\(2, 1, 64, 96\)\]"),
        ("my_sod.broken:not_a_module", "returned a function, not a torch.nn.Module"),
        ("my_sod.broken:not_callable", "'not_callable' is a int, not a function"),
        ("my_sod.broken:absent", r"module 'my_sod.broken' \(.*broken.py\) has no 'absent'"),
        ("my_sod.missing:build", "cannot import module 'my_sod.missing'.*PYTHONPATH"),
    ],
)
def test_a_network_that_breaks_the_contract_fails_at_build_naming_the_factory(package_root, factory, message):
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(factory=factory))


def test_factory_settings_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="model.factory='my_sod.tiny' must name a function as 'package.module:fu"):
        load_config(None, ["model.factory=my_sod.tiny"])
    with pytest.raises(ConfigError, match=r"model.options \(width\) are the settings of a model.factory network"):
        load_config(None, ["model.options.width=8"])


def test_predict_names_the_module_best_pt_needs_when_it_is_not_importable(tmp_path):
    cfg = load_config(None, ["model.factory=gone_sod.net:build"])
    best = save_best(tmp_path, {}, cfg.model_dump(mode="json"), {}, step=1)
    with pytest.raises(EvaluationError, match=rf"checkpoint '{best}': .*cannot import module 'gone_sod.net'"):
        load_best_weights(best)


@pytest.mark.slow
def test_the_readme_network_trains_resumes_bitwise_predicts_and_exports(tmp_path, package_root):
    train, val = synthesize(tmp_path / "demo", train=32, val=8, size=64, seed=3)
    cfg = {
        "name": "own",
        "out_dir": str(tmp_path / "runs"),
        "data": {"train": [str(train)], "val": [str(val)], "size": 64, "eval_size": 64, "batch_size": 8, "workers": 0},
        "model": {"factory": FACTORY, "options": {"width": 8}},
        "loss": {"side_weights": [0.5]},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 4},
        "eval": {"every": 2},
        "checkpoint": {"every": 2, "keep": 5},
        "log": {"every": 2, "plots": False},
    }
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "runs" / "own"

    # loss.side_weights must weigh the network's one side logit: the default four stop the build.
    proc = forked_run(["-m", "salnet.train", "--config", path, "loss.side_weights=[0.5,0.25]"], env=env, check=False)
    assert proc.returncode != 0
    assert (
        "model.factory='my_sod.tiny:build' returns 1 side logits in training, but loss.side_weights=[0.5, 0.25]"
        in proc.stderr
    )

    forked_run(["-m", "salnet.train", "--config", path, "train.resume=none"], env=env, timeout=300)
    last = run_dir / "checkpoints" / "step-00000004"
    uninterrupted = torch.load(last / "state.pt", weights_only=True)
    shutil.rmtree(last)
    out = forked_run(["-m", "salnet.train", "--config", path], env=env, timeout=300).stdout
    assert "step-00000002 at step 2" in out
    resumed = torch.load(last / "state.pt", weights_only=True)
    for key, value in uninterrupted["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(uninterrupted["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    best_pt = RunDir(run_dir).best
    assert load_best(best_pt)["config"]["model"]["factory"] == FACTORY
    stems = ecssd_folder(tmp_path / "ECSSD", 2)
    salnet_predict.main(
        ["--checkpoint", str(best_pt), f"ecssd={tmp_path / 'ECSSD' / 'images'}", "--out", str(tmp_path / "maps")]
        + ["--workers", "0"]
    )
    for stem in stems:
        with (
            Image.open(tmp_path / "ECSSD" / "images" / f"{stem}.jpg") as image,
            Image.open(tmp_path / "maps" / "ecssd" / f"{stem}.png") as saliency,
        ):
            assert saliency.size == image.size and np.asarray(saliency).dtype == np.uint8

    exported = tmp_path / "own.pt"
    export.main(["--checkpoint", str(best_pt), "--format", "torchscript", "--out", str(exported)])
    extra = {"salnet.json": ""}
    loaded = torch.jit.load(str(exported), _extra_files=extra)
    eager = load_best_weights(best_pt).model
    image = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(image), torch.sigmoid(eager(image)), atol=1e-5)
    assert json.loads(extra["salnet.json"])["eval_size"] == 64
