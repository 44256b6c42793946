"""`python -m salnet.bench plan`: the cost model's memory terms against a real 2-rank step, its
formulas, its output and its errors.

Run as a script (by `ranks()`), this file is the probe: each rank builds a small SalNet (resnet18,
decoder width 32, 64 px) under DDP and DeepSpeed ZeRO-1/2/3 in turn, takes one real training
step, and rank 0 writes what the largest rank holds: weights, gradients (after backward), optimizer
states (after the step), DDP's reducer buckets, and the bytes autograd saved in a real forward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from salnet.bench import _plan_comm as comm
from salnet.bench import _plan_memory as memory
from salnet.bench import plan
from salnet.config import load_config

from conftest import ranks

SMALL = [
    "model.backbone.name=resnet18",
    "model.ppm_width=32",
    "model.fpn_width=32",
    "data.size=64",
    "data.batch_size=4",
    "train.channels_last=false",
]
CASES = {
    "ddp": [],
    "zero1": ["train.strategy=deepspeed", "train.zero_stage=1"],
    "zero2": ["train.strategy=deepspeed", "train.zero_stage=2"],
    "zero3": ["train.strategy=deepspeed", "train.zero_stage=3"],
    "ddp_sgd": ["optim.name=sgd"],
}
# The plan's activations against the real step's: the plan counts the network on the meta device and
# the loss on CPU zeros apart (a tensor both keep would count twice), the real step runs through the
# strategy's wrapper. Equal to the byte today (fp32, DDP); the margin is for torch versions.
ACTIVATION_TOLERANCE = 0.01


def small_config(case: str, *extra: str):
    return load_config(None, [*SMALL, *CASES[case], *extra])


def unique_bytes(tensors) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(storages.values())


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


# --- the probe (each rank, under ranks(2, ...)) -------------------------------------------------------


def held_by_strategy(strategy, case: str) -> dict:
    """Weights and the optimizer's states, where salnet's DDP and DeepSpeed 0.19 keep them."""
    params = list(strategy.module.parameters())
    if case.startswith("ddp"):
        return {"weights": unique_bytes(params), "optimizer": state_bytes(strategy.optimizer)}
    zero = strategy.engine.optimizer
    basic = state_bytes(strategy.engine.basic_optimizer)
    if case == "zero3":  # whole persistent parameters, and this rank's piece of the others
        return {
            "weights": unique_bytes(params) + unique_bytes(zero.fp16_partitioned_groups_flat),
            "optimizer": basic + unique_bytes(zero.fp32_partitioned_groups_flat),
        }
    return {"weights": unique_bytes(params), "optimizer": basic + unique_bytes(zero.single_partition_of_fp32_groups)}


def gradient_bytes(strategy, case: str) -> int:
    if case.startswith("ddp"):
        return sum(p.grad.nbytes for p in strategy.module.parameters() if p.grad is not None)
    zero = strategy.engine.optimizer
    if case == "zero3":
        return zero.grad_partitions_flat_buffer.nbytes
    # The gradients of this rank's partition: views into the buffer DeepSpeed reduced them into.
    return unique_bytes(g for group in zero.averaged_gradients.values() for g in group)


def probe_case(case: str, out: Path) -> None:
    from salnet import dist
    from salnet.data import TrainInput
    from salnet.loss import build_loss
    from salnet.model import build_model
    from salnet.strategy import build_strategy

    cfg = small_config(case, f"out_dir={out / 'runs'}", f"name={case}")
    torch.manual_seed(0)
    strategy = build_strategy(cfg, build_model(cfg.model), total_steps=2)
    loss_fn = build_loss(cfg.loss)
    to_input = TrainInput(cfg.data, dist.device(), cfg.train.channels_last)
    gen = torch.Generator().manual_seed(dist.rank())
    for _ in range(2):  # the second step is measured: DDP has rebuilt its buckets, DeepSpeed has its trace
        batch = {
            "image": torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=gen),
            "mask": torch.randint(0, 2, (4, 1, 64, 64), dtype=torch.uint8, generator=gen) * 255,
        }
        image, target = to_input(batch)
        strategy.train()
        with memory.SavedTensors(exclude=strategy.module.parameters()) as saved:
            strategy.forward_backward(image, target, loss_fn, sync=True)
        gradients = gradient_bytes(strategy, case)
        buckets = strategy._ddp._get_ddp_logging_data()["bucket_sizes"] if case.startswith("ddp") else ""
        strategy.optimizer_step()
    record = {
        **held_by_strategy(strategy, case),
        "gradients": gradients,
        "buckets": sum(int(b) for b in buckets.split(",") if b.strip()),
        "activations": saved.total,
    }
    largest = dist.all_reduce_values(list(record.values()), "max")  # float64: exact for these sizes
    record = dict(zip(record, map(int, largest)))
    if dist.is_main():
        (out / f"{case}.json").write_text(json.dumps(record))


def probe(out: Path, cases: list[str]) -> None:
    from salnet import dist

    torch.set_num_threads(1)
    with dist.distributed(use_cuda=False):
        for case in cases:
            probe_case(case, out)


# --- the tests ------------------------------------------------------------------------------------------

# ZeRO-1 takes ZeRO-2's code path in DeepSpeed 0.19 (the same layout, measured); SGD under DDP only (no
# DeepSpeed start-up to pay for it: its state is one momentum buffer either way).
PROBED = ("ddp", "zero2", "zero3", "ddp_sgd")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    ranks(2, [Path(__file__), out, *PROBED], timeout=180)
    return {case: json.loads((out / f"{case}.json").read_text()) for case in PROBED}


@pytest.mark.slow
@pytest.mark.parametrize("case", PROBED)
def test_model_state_terms_are_what_a_real_two_rank_step_holds(measured, case):
    cfg = small_config(case)
    planned = memory.model_states(memory.model_shape(cfg), cfg, world=2)
    real = measured[case]
    assert {term: planned[term] for term in ("weights", "gradients", "optimizer")} == {
        term: real[term] for term in ("weights", "gradients", "optimizer")
    }
    if case.startswith("ddp"):
        assert planned["buffers"] == real["buckets"]  # DDP's reducer: one more copy of every gradient


@pytest.mark.slow
def test_activations_are_what_a_real_step_saves_for_backward(measured):
    planned = memory.activations(small_config("ddp")).at(4)
    assert planned == pytest.approx(measured["ddp"]["activations"], rel=ACTIVATION_TOLERANCE)
    # ZeRO-3 also keeps the weights it gathered for backward: more than DDP's activations, within the plan's bound.
    gathered = measured["zero3"]["activations"] - measured["ddp"]["activations"]
    cfg = small_config("zero3")
    bound = memory.model_states(memory.model_shape(cfg), cfg, world=2)["buffers"] - cfg.train.bucket_mb * 2**20
    assert 0 < gathered <= bound


def test_bf16_activations_separate_autocasts_weight_copies():
    fp32 = memory.activations(small_config("ddp"))
    bf16 = memory.activations(small_config("ddp", "train.amp=bf16"))
    assert bf16.per_image < fp32.per_image
    params = memory.model_shape(small_config("ddp")).total
    assert bf16.constant == pytest.approx(2 * params, rel=0.05)  # one bf16 copy of each weight
    assert fp32.constant < 0.01 * bf16.constant


def test_activations_are_planned_at_the_largest_multiscale_size(capsys, tmp_path):
    multiscale = memory.activations(small_config("ddp", "data.size=32", "data.multiscale=[32,64,48]"))
    assert (multiscale.size, multiscale.per_image) == (64, memory.activations(small_config("ddp")).per_image)
    # --size plans every batch at that size: the config's multiscale list no longer applies.
    config = tmp_path / "multiscale.yaml"
    config.write_text("data:\n  multiscale: [32, 64]\n")
    small = [f"--set={o}" for o in SMALL if not o.startswith("data.size")]
    report = run_plan(capsys, f"--config={config}", *small, "--size=48")
    assert "at 48 px" in " ".join(report["assumptions"])


def test_ring_collectives_follow_their_message_sizes():
    params, gbs = 250_000_000, 100.0  # 1 GB of float32 gradients
    ddp = comm.collectives(small_config("ddp"), params, world=8, gbs=gbs)
    assert [(c.name, c.seconds) for c in ddp] == [("all-reduce gradients", pytest.approx(2 * 7 / 8 * 1e9 / 100e9))]
    zero2 = comm.collectives(small_config("zero2"), params, world=8, gbs=gbs)
    zero3 = comm.collectives(small_config("zero3"), params, world=8, gbs=gbs)
    assert sum(c.seconds for c in zero2) == pytest.approx(ddp[0].seconds)
    assert sum(c.seconds for c in zero3) == pytest.approx(1.5 * ddp[0].seconds)
    assert comm.collectives(small_config("ddp"), params, world=1, gbs=gbs) == []
    network = comm.Network(intra_gbs=450, inter_gbs=100)
    assert (network.ring_gbs(1), network.ring_gbs(4)) == (450, 100)
    hidden = comm.step_time(small_config("ddp"), ddp, images_per_s=4 / 0.03)  # 30 ms of compute, 17.5 ms hidden
    assert hidden.step_s == pytest.approx(0.03)
    exposed = comm.step_time(small_config("ddp"), ddp, images_per_s=4 / 0.015)  # 10 ms of backward hides 10
    assert exposed.step_s == pytest.approx(0.015 + 0.0175 - 0.01)


def run_plan(capsys, *argv) -> dict:
    plan.main([*argv, "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plan_partitions_each_term_by_stage_and_world(capsys):
    small = [f"--set={o}" for o in SMALL if not o.startswith("data.batch_size")]
    report = run_plan(
        capsys,
        *small,
        "--nodes=1,4",
        "--gpus-per-node=2",
        "--strategy=ddp,deepspeed",
        "--zero-stage=2,3",
        "--micro-batch=4",
        "--precision=fp32",
        "--throughput=100",
    )
    rows = {(p["strategy"], p["gpus"]): p for p in report["plans"]}
    assert sorted(rows) == sorted((s, g) for s in ("DDP", "ZeRO-2", "ZeRO-3") for g in (2, 8))
    mem = {key: p["memory_bytes"] for key, p in rows.items()}
    assert mem["DDP", 8]["optimizer"] == mem["DDP", 2]["optimizer"]  # replicated
    assert mem["ZeRO-2", 8]["optimizer"] == pytest.approx(mem["ZeRO-2", 2]["optimizer"] / 4, rel=1e-3)
    assert mem["ZeRO-2", 8]["weights"] == pytest.approx(mem["DDP", 8]["weights"], rel=1e-5)
    assert mem["ZeRO-3", 8]["weights"] < mem["ZeRO-3", 2]["weights"] < mem["DDP", 2]["weights"]
    assert len({m["activations"] for m in mem.values()}) == 1
    assert all(m["total"] == sum(v for k, v in m.items() if k != "total") for m in mem.values())
    ddp = rows["DDP", 8]
    assert ddp["ring_gbs"] == plan.INTER_GBS and rows["DDP", 2]["ring_gbs"] == plan.INTRA_GBS
    assert ddp["compute_s"] == pytest.approx(4 / 100)
    assert ddp["global_batch"] == 32 and ddp["images_per_s"] == pytest.approx(32 / ddp["step_s"])
    assert any("activations" in note for note in report["assumptions"])


def test_the_deepspeed_section_moves_what_it_sets():
    cfg = small_config("zero3")
    default = memory.model_states(memory.model_shape(cfg), cfg, world=8)
    passed = load_config(
        None,
        [
            *SMALL,
            *CASES["zero3"],
            "deepspeed.zero_optimization.stage3_max_live_parameters=1000",
            "deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
            "deepspeed.zero_optimization.overlap_comm=false",
        ],
    )
    planned = memory.model_states(memory.model_shape(passed), passed, world=8)
    assert planned["buffers"] == cfg.train.bucket_mb * 2**20 + 1000 * 4 < default["buffers"]
    assert planned["weights"] < default["weights"]  # no parameter kept whole
    assert not any(c.hidden_by_backward and "gradients" in c.name for c in comm.collectives(passed, 10**6, 8, 100))


def test_compute_comes_from_stated_tflops_and_the_networks_flops(capsys):
    from salnet.model.cost import meta_model, train_flops_per_image

    report = run_plan(capsys, *(f"--set={o}" for o in SMALL), "--tflops=2", "--gpus-per-node=1")
    (one_gpu,) = report["plans"]
    flops = train_flops_per_image(meta_model(small_config("ddp").model), 64, 64)
    assert one_gpu["compute_s"] == pytest.approx(4 * flops / 2e12)
    assert (one_gpu["collectives_s"], one_gpu["step_s"], one_gpu["scaling"]) == ({}, one_gpu["compute_s"], 1.0)
    assert one_gpu["memory_bytes"]["buffers"] == 0  # no reducer on one GPU


def test_the_table_and_its_assumptions_are_printed(capsys):
    plan.main([*(f"--set={o}" for o in SMALL), "--nodes=2", "--strategy=deepspeed", "--zero-stage=3"])
    out = capsys.readouterr().out
    assert "| 2x8 | ZeRO-3 |" in out
    assert "all-gather weights (forward)" in out and "assumptions:" in out and "100 GB/s per node" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--zero-stage=4"], "--zero-stage takes 1, 2 or 3"),
        (["--strategy=fsdp"], "unknown strategy 'fsdp'; valid: ddp, deepspeed"),
        (["--nodes=0"], "expected integers >= 1"),
        (["--gpus-per-node=4,8"], "expected one integer >= 1"),
        (["--set=optim.lrr=1e-3"], "optim.lrr"),
        (["--set=train.amp=fp16"], "fp16"),
        (["--throughput=10", "--tflops=100"], "not allowed with argument"),
    ],
)
def test_bad_input_is_refused_naming_it(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        plan.main([*(f"--set={o}" for o in SMALL), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


if __name__ == "__main__":
    probe(Path(sys.argv[1]), sys.argv[2:])
