"""salnet.export: TorchScript and ONNX files that match eager PyTorch at any input size (CPU, resnet18)."""

import json
import re
import warnings

import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from evaluation_data import tiny_checkpoint

from salnet.evaluation import export
from salnet.evaluation.common import load_best_weights
from salnet.evaluation.export import Saliency, adaptive_avg_pool2d
from salnet.run.rundir import RunDir

from conftest import forked_run

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("run"))
    return path, Saliency(load_best_weights(path).model)


def printed_parity(stdout: str) -> dict[str, float]:
    return {shape: float(diff) for shape, diff in re.findall(r"at (\S+): max \|diff\| (\S+)", stdout)}


def assert_matches_eager(run, module, sizes):
    gen = torch.Generator().manual_seed(1)
    for batch, height, width in sizes:
        x = torch.randn(batch, 3, height, width, generator=gen)
        with torch.no_grad():
            want = module(x)
        got = run(x)
        assert got.shape == want.shape == (batch, 1, height, width)
        assert (got - want).abs().max().item() <= TOLERANCE, (height, width)
        assert 0 <= got.min() and got.max() <= 1  # probabilities


def test_torchscript_matches_eager_pytorch_at_any_size(eager, tmp_path):
    checkpoint, module = eager
    out = tmp_path / "salnet.pt"
    proc = forked_run(
        [
            "-m",
            "salnet.export",
            "--checkpoint",
            checkpoint,
            "--format",
            "torchscript",
            "--out",
            out,
            "--check-sizes",
            "64x64",
            "45x77",
        ]
    )
    parity = printed_parity(proc.stdout)
    assert list(parity) == ["2x3x64x64", "2x3x45x77"] and max(parity.values()) <= TOLERANCE

    extra = {"salnet.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still what TorchScript users load
        loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["salnet.json"])["eval_size"] == 64
    assert_matches_eager(lambda x: loaded(x), module, [(1, 96, 64), (3, 50, 70)])


@pytest.mark.slow
def test_onnx_matches_eager_pytorch_at_any_size_with_onnxruntime(eager, tmp_path):
    checkpoint, module = eager
    out = tmp_path / "salnet.onnx"
    proc = forked_run(
        [
            "-m",
            "salnet.export",
            "--checkpoint",
            checkpoint,
            "--format",
            "onnx",
            "--out",
            out,
            "--check-sizes",
            "64x64",
            "77x45",
        ],
        timeout=300,
    )
    parity = printed_parity(proc.stdout)
    assert list(parity) == ["2x3x64x64", "2x3x77x45"] and max(parity.values()) <= TOLERANCE
    assert [p.name for p in tmp_path.iterdir()] == ["salnet.onnx"]  # one self-contained file

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    (image,), (saliency,) = proto.graph.input, proto.graph.output
    assert (image.name, saliency.name) == ("image", "saliency")
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3])), (
        dims
    )  # dynamic batch, height, width
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["salnet"])
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert_matches_eager(
        lambda x: torch.from_numpy(session.run(["saliency"], {"image": x.numpy()})[0]),
        module,
        [(1, 96, 64), (3, 50, 70), (1, 33, 33)],
    )


@pytest.mark.parametrize("bins", [1, 2, 3, 6, (2, 5)])
def test_the_exportable_adaptive_pooling_equals_torch(bins):
    gen = torch.Generator().manual_seed(0)
    for height, width in [(1, 1), (2, 3), (3, 3), (5, 7), (11, 4), (12, 12)]:
        x = torch.randn(2, 4, height, width, generator=gen)
        torch.testing.assert_close(adaptive_avg_pool2d(x, bins), F.adaptive_avg_pool2d(x, bins), rtol=0, atol=1e-6)


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, capsys):
    bad = RunDir(tmp_path).best
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        export.main(["--checkpoint", str(bad), "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and str(bad) in err and "as a salnet best.pt:" in err and "Traceback" not in err
