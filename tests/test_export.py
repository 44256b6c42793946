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


def test_an_export_failing_its_parity_check_leaves_no_file_that_looks_like_one(eager, tmp_path, monkeypatch, capsys):
    """Issue 22, item 14: written under a temporary name, renamed only once it passed the check."""
    checkpoint, _ = eager
    out = tmp_path / "salnet.pt"
    out.write_bytes(b"an earlier, checked export")
    good = export.export_torchscript

    def off_by_a_little(module, example, path, meta):  # an exporter whose file computes something else
        run = good(module, example, path, meta)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(export, "export_torchscript", off_by_a_little)
    args = ["--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out), "--check-sizes", "64"]
    with pytest.raises(SystemExit) as exit_:
        export.main(args)
    err = capsys.readouterr().err
    assert out.read_bytes() == b"an earlier, checked export" and list(tmp_path.iterdir()) == [out]
    assert exit_.value.code == 1 and "Traceback" not in err
    assert f"{out}: the exported model differs from eager PyTorch" in err and "not written" in err, err

    monkeypatch.setattr(export, "export_torchscript", good)
    export.main(args)
    assert torch.jit.load(str(out)) is not None and list(tmp_path.iterdir()) == [out]


def test_a_wrong_out_or_a_training_checkpoint_folder_is_one_line_naming_it(eager, tmp_path, capsys):
    """Issue 22, item 14: --out a folder or under a file; --checkpoint a training checkpoint folder."""
    from salnet.run.checkpoint import CONFIG
    from salnet.run.checksums import MANIFEST

    checkpoint, _ = eager
    run = RunDir(tmp_path / "runs" / "r")
    step = run.checkpoints / "step-00000004"
    step.mkdir(parents=True)
    (step / MANIFEST).write_text("{}")
    (step / CONFIG).write_text("{}")
    run.best.write_bytes(b"")
    a_file = tmp_path / "file"
    a_file.write_text("")
    for ckpt, out, words in (
        (checkpoint, tmp_path, [f"--out '{tmp_path}' is a folder"]),
        (checkpoint, a_file / "x.pt", [f"'{a_file}' is a file, not a folder"]),
        (
            step,
            tmp_path / "x.pt",
            [
                f"'{step}' is a training checkpoint folder",
                f"python -m salnet.strategy.convert {step} OUT_DIR",
                str(run.best),
            ],
        ),
        (run.root, tmp_path / "x.pt", [f"pass the best.pt inside it, {run.best}"]),
    ):
        with pytest.raises(SystemExit) as exit_:
            export.main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and len(err.strip().splitlines()) == 1, err
        assert all(w in err for w in words), (words, err)
