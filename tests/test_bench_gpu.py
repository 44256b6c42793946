"""`python -m salnet.bench gpu` without a GPU: it refuses clearly, and every part of it that can
run on a CPU runs here at toy sizes (real model, real loader in both augmentation modes, real
metrics reference, real DDP and ZeRO-2 worker processes), so the check is sound before a GPU
node ever runs it. (torch.compile is left to the GPU: on a CPU it needs a C++ toolchain and minutes.)"""

import pytest
import torch

from salnet.bench import gpu

from conftest import run_py


def test_without_cuda_it_refuses_saying_why():
    proc = run_py(["-m", "salnet.bench", "gpu"], env={"CUDA_VISIBLE_DEVICES": ""}, check=False, timeout=120)
    assert proc.returncode != 0
    assert "needs a CUDA GPU and sees none" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H200", 989.5),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10", 125.0),
    ],
)
def test_the_peak_table_knows_the_common_gpus_with_a_source(name, tflops):
    peak, source = gpu.peak_bf16(name)
    assert peak == tflops and "datasheet" in source


def test_an_unknown_gpu_has_no_peak():
    assert gpu.peak_bf16("NVIDIA GeForce RTX 4090") is None


@pytest.mark.slow
def test_the_cpu_parts_run_at_toy_sizes(tmp_path):
    args = gpu.parse(
        [
            "--backbone",
            "resnet18",
            "--size",
            "32",
            "--batch",
            "2",
            "--steps",
            "2",
            "--feed-steps",
            "3",
            "--image-size",
            "48",
            "--workers",
            "1",
            "--metrics-images",
            "4",
            "--repeats",
            "1",
        ]
    )
    step = gpu.measure_step(args, "cpu", compile=False, peak_tflops=1.0)
    assert step["img_s"] > 0 and step["peak_memory_mib"] > 0
    assert 0.1 < step["train_gflops_per_image"] < 10 and step["mfu"] > 0  # resnet18 FPN at 32 px: ~0.6 GFLOP

    train_dir = gpu.synthetic_shards(tmp_path, args)
    for mode in gpu.MODES:
        feed = gpu.measure_feed(args, "cpu", train_dir, mode)
        assert feed["steps"] == 3 and feed["img_s"] > 0 and 0 <= feed["data_wait"] <= 1
        assert ("device_augment_ms_per_batch" in feed) == (mode == "device"), feed

    metrics = gpu.measure_metrics(args, "cpu")
    assert set(metrics) == {"F+E+S+MAE", "wF"}
    assert all(row["max_abs_diff"] < 1e-4 and row["salnet_images_per_s"] > 0 for row in metrics.values()), metrics

    memory = gpu.measure_memory(args, "cpu")
    assert memory["world"] == 1 and memory["ddp"]["held_mib"] > 0 and memory["zero2"]["held_mib"] > 0
    assert memory["zero2_held_vs_ddp"] > 0 and "nothing to partition" in memory["note"]


def toy_args(*extra):
    return gpu.parse(["--size", "32", "--batch", "2", "--steps", "1", "--repeats", "1", *extra])


def test_backbones_are_a_repeatable_comma_list_checked_when_parsed(capsys):
    args = toy_args("--backbone", "resnet18,swin_t", "--backbone", "resnet18", "--parts", "step,compile")
    assert args.backbones == ["resnet18", "swin_t"] and args.backbone == "resnet18"
    assert args.parts == ["step", "compile"] and gpu.parse([]).backbones == ["resnet50"]
    for wrong in (["--backbone", "resnet18,swin_x"], ["--parts", "step,speed"]):
        with pytest.raises(SystemExit):
            gpu.parse(wrong)
    err = capsys.readouterr().err
    assert "not a known backbone" in err and "unknown part 'speed'" in err


def test_each_backbone_gets_its_step_measured_with_its_own_flops():
    args = toy_args("--backbone", "resnet18,swin_t,vit_h_14")
    asked = []

    def due(part, backbone):
        asked.append((part, backbone))
        return backbone != "vit_h_14"  # as when the budget runs out before the last one

    runs = gpu.measure_backbones(args, "cpu", compile=False, peak_tflops=1.0, due=due)
    assert asked == [("step", "resnet18"), ("step", "swin_t"), ("step", "vit_h_14")]
    assert list(runs) == ["resnet18", "swin_t"]
    for run in runs.values():
        assert run["img_s"] > 0 and run["mfu"] > 0 and run["peak_memory_mib"] > 0
    assert runs["resnet18"]["train_gflops_per_image"] != runs["swin_t"]["train_gflops_per_image"]


def test_out_of_memory_or_a_failed_compile_is_that_backbones_error_and_the_next_goes_on(monkeypatch):
    args = toy_args("--backbone", "resnet18,swin_t")

    def step(args, device, compile, peak_tflops, backbone):
        if backbone == "resnet18":
            raise torch.OutOfMemoryError("CUDA out of memory")
        if compile:
            raise RuntimeError("inductor says no")
        return {"img_s": 1.0}

    monkeypatch.setattr(gpu, "measure_step", step)
    eager = gpu.measure_backbones(args, "cpu", compile=False, peak_tflops=None, due=lambda part, name: True)
    assert eager["resnet18"]["error"].startswith("out of memory at batch 2") and eager["swin_t"] == {"img_s": 1.0}
    compiled = gpu.measure_backbones(args, "cpu", compile=True, peak_tflops=None, due=lambda part, name: True)
    assert compiled["swin_t"] == {"error": "torch.compile: RuntimeError: inductor says no"}

    monkeypatch.setattr(gpu, "measure_step", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # an eager step that fails is a bug, not a measurement
        gpu.measure_backbones(args, "cpu", compile=False, peak_tflops=None, due=lambda part, name: True)
