"""DeepSpeed ZeRO (train.strategy=deepspeed): stages 1-3, optional CPU offload, CPU (gloo) or CUDA.

How the engine maps onto the Strategy interface:
- forward_backward: the engine's forward and backward. The accumulation boundary is set from
  `sync` before each micro-batch, so the engine steps once per optimizer step whatever its own
  micro-step counter says.
- optimizer_step: engine.step(). ZeRO skips a step whose gradient norm is not finite; that norm is
  all-reduced, so every rank skips together. A non-finite loss is made to poison the gradients, so
  that check sees it even when autograd would not have. salnet's lr schedule (the one DDP uses) is
  stepped here, skipped steps included. BatchNorm buffers are then broadcast from rank 0, as under
  DDP (after every optimizer step), so every rank validates, saves and exports the same network.
  The stop request (a preemption signal) is agreed in one extra small all-reduce: the engine's
  own collectives cannot carry it.
- save/load: engine.save_checkpoint/load_checkpoint write into and read from the directory
  salnet.run.checkpoint hands over (its hidden temporary directory while saving, so an interrupted save
  is never resumed from), next to salnet_state.pt (schedule, client state, world size). Every file,
  DeepSpeed's included, is read with weights_only=True (see WeightsOnlyCheckpointEngine).
- fp32_state_dict: the fp32 master weights gathered from ZeRO's partitions, with the buffers, in
  module.state_dict() order: exactly the format DDP writes to best.pt.

Memory format: parameters stay in the default layout (DeepSpeed flattens them into contiguous
partitions, and its initial broadcast refuses channels_last weights); train.channels_last still
turns the inputs to NHWC, and convolutions follow their input's layout.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from salnet import dist
from salnet.config import Config
from salnet.fsio import atomic_write, umask_mode
from salnet.optim import build_schedule, param_groups
from salnet.run.checksums import FileDigest, file_digest, load_file, save_hashed
from salnet.run.rundir import RunDir
from salnet.strategy.base import (
    AMP_DTYPES,
    SkipReason,
    StepResult,
    Strategy,
    broadcast_buffers,
    decoder_lr,
    fp32_copy,
    step_schedule,
    with_sync_bn,
)
from salnet.strategy.zero_config import deepspeed_config

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator once, at import: without CUDA it has to be told to use the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (after DS_ACCELERATOR)
import deepspeed.ops  # noqa: E402
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, set_z3_leaf_modules  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

# DeepSpeed's CPU communication backend builds a shared-memory all-reduce kernel when it starts (a
# C++ compiler and about two minutes on two cores); only DeepSpeed's inference path uses it. Marked
# unavailable, training collectives run on the process group (gloo) as they would anyway.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
# DeepSpeed 0.19 still calls collectives torch has renamed; the warnings are DeepSpeed's, once per rank.
warnings.filterwarnings(
    "ignore",
    message=r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)

TAG = "deepspeed"  # DeepSpeed's own files go to <checkpoint>/deepspeed/
SALNET_STATE = "salnet_state.pt"  # salnet's part of a checkpoint, next to them
_PARTITION_RANK = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank partition files

# The only non-tensor types DeepSpeed writes into its checkpoint files (ZeRO 1-3, fp32/bf16/fp16;
# found with torch.serialization.get_unsafe_globals_in_checkpoint): plain data holders.
CHECKPOINT_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, reading with weights_only=True.

    DeepSpeed's own engine loads with weights_only=False, which would run any code a tampered
    checkpoint carries; this one unpickles only tensors, containers and CHECKPOINT_CLASSES.
    """

    def load(self, path: str, map_location=None):
        return load_file(Path(path), map_location=map_location, safe_globals=tuple(CHECKPOINT_CLASSES))


def mark_attention_callers_as_leaves(model: nn.Module) -> None:
    """ZeRO-3 hooks stop at the modules that call an nn.MultiheadAttention (torchvision ViT's encoder blocks).

    ZeRO-3 wraps every tensor a module receives in an autograd function of its own, so the one
    tensor a self-attention receives as query, key and value arrives as three tensors.
    MultiheadAttention then projects them with three matrix products instead of its packed one,
    and the gradients differ from DDP's by roundings. Inside a ZeRO-3 "leaf" no hooks are set: its
    parameters are gathered when the leaf's forward starts, and the attention sees one tensor.
    """
    owners = {type(m) for m in model.modules() if any(isinstance(c, nn.MultiheadAttention) for c in m.children())}
    if owners:
        set_z3_leaf_modules(model, sorted(owners, key=lambda t: t.__qualname__))


class DeepSpeedStrategy(Strategy):
    def __init__(self, cfg: Config, model: nn.Module, total_steps: int):
        super().__init__(cfg)
        train = cfg.train
        if train.amp == "fp16" and dist.device().type != "cuda":
            raise ValueError(
                "train.amp=fp16 with train.strategy=deepspeed needs CUDA: DeepSpeed's CPU accelerator has no fp16; "
                "use train.amp=bf16 or train.amp=fp32"
            )
        if train.compile:
            raise ValueError(
                "train.compile=true is not supported with train.strategy=deepspeed (ZeRO's parameter hooks "
                "and torch.compile are combined by DeepSpeed's own compiler integration, which salnet does "
                "not drive); set train.compile=false"
            )
        self.ds_config = deepspeed_config(cfg, world_size=dist.world_size())
        if not dist.is_initialized():
            _one_rank_job_environment()
        model = with_sync_bn(model, cfg)
        if train.zero_stage == 3:
            mark_attention_callers_as_leaves(model)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim), config=self.ds_config
        )
        if (
            type(engine.checkpoint_engine) is TorchCheckpointEngine
        ):  # another engine chosen by pass-through is the user's call
            # Built like DeepSpeed builds its own, from the engine's parsed config (no public accessor).
            engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
        self.engine = engine
        self.module = engine.module  # ZeRO-3's gathering hooks sit on the module itself: predict() works on it
        self.needs_equal_forward_passes = train.zero_stage == 3
        self.amp_dtype = AMP_DTYPES.get(train.amp)
        # The schedule wraps the torch optimizer inside ZeRO, whose param groups hold the
        # partitions DeepSpeed steps: setting their lr is what the step uses.
        self.schedule = build_schedule(engine.basic_optimizer, cfg.optim, total_steps)
        self._loss_finite = torch.ones((), dtype=torch.bool, device=dist.device())
        if dist.is_main():
            with atomic_write(RunDir(cfg.run_dir).deepspeed_config) as f:
                json.dump(self.ds_config, f, indent=2)

    def train(self) -> None:
        self.engine.train()

    def forward_backward(self, image, target, loss_fn, sync: bool):
        self.engine.set_gradient_accumulation_boundary(sync)
        outputs = self.engine(image)  # the engine applies torch_autocast (bf16) or casts inputs (fp16) itself
        total, parts = loss_fn(outputs, target)
        finite = torch.isfinite(total.detach())
        self._loss_finite &= finite
        # x 1 when finite (exact), x NaN otherwise: every gradient turns NaN, so ZeRO's all-reduced
        # norm check skips the step on all ranks. No host sync: the flag stays on the device.
        self.engine.backward(total * torch.where(finite, 1.0, torch.nan))
        return total.detach(), parts

    def optimizer_step(self, stop: int = 0) -> StepResult:
        self.engine.step()
        skipped = None
        if not self.engine.was_step_applied():  # the same verdict on every rank: the norm was all-reduced
            if dist.any_rank(not bool(self._loss_finite)):
                skipped = SkipReason.NON_FINITE_LOSS
            elif self.amp_dtype == torch.float16:
                skipped = SkipReason.FP16_OVERFLOW
            else:
                skipped = SkipReason.NON_FINITE_GRADIENTS
        step_schedule(self.schedule)
        broadcast_buffers(self.module)
        self._loss_finite.fill_(True)
        norm = self.engine.get_global_grad_norm()
        return StepResult(
            grad_norm=float(norm) if norm is not None else float("nan"),
            skipped=skipped,
            stop=int(dist.all_reduce_scalar(stop, "max")),
        )

    def lr(self) -> float:
        return decoder_lr(self.engine.basic_optimizer)

    def save(self, directory: Path, client_state: dict) -> dict[str, FileDigest]:
        self.engine.save_checkpoint(str(directory), tag=TAG)
        if dist.is_main():
            # DeepSpeed copies its recovery scripts (zero_to_fp32.py, ...) in and adds u+x alone, whatever
            # the umask: give them the mode an executable made under the umask has, as every file of a run does.
            for script in directory.rglob("*.py"):
                os.chmod(script, umask_mode(executable=True))
        dist.barrier()  # every rank's files are complete before anyone hashes
        digests = {}
        if dist.is_main():
            state = {"schedule": self.schedule.state_dict(), "world_size": dist.world_size(), "client": client_state}
            digests[SALNET_STATE] = save_hashed(state, directory / SALNET_STATE)
        # DeepSpeed writes its files itself: each rank hashes its own partitions once, rank 0 the shared files.
        for path in sorted(directory.rglob("*")):
            owner = _PARTITION_RANK.search(path.name)
            mine = int(owner[1]) == dist.rank() if owner else dist.is_main()
            if path.is_file() and path.name != SALNET_STATE and mine:
                digests[str(path.relative_to(directory))] = file_digest(path)
        return digests

    def load(self, directory: Path) -> dict:
        state = load_file(directory / SALNET_STATE, map_location="cpu")
        if state["world_size"] != dist.world_size():
            raise ValueError(
                f"{directory} holds the ZeRO partitions of a {state['world_size']}-rank run; DeepSpeed cannot load them into "
                f"{dist.world_size()} rank(s). Resume with {state['world_size']} ranks, or start over with "
                f"train.resume=none (python -m salnet.strategy.convert {directory} exports its weights)"
            )
        # The optimizer's state brings back its param groups, and with them the lr of the next step.
        loaded, _ = self.engine.load_checkpoint(str(directory), tag=TAG)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {directory / TAG}")
        self.schedule.load_state_dict(state["schedule"])
        return state["client"]

    def fp32_state_dict(self) -> dict:
        params = dict(self.module.named_parameters())
        weights = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            master = safe_get_full_fp32_param(params[name]) if name in params else None
            # Parameters come from ZeRO's fp32 master copy (a collective); buffers are whole on every rank.
            weights[name] = master if master is not None else tensor
        return fp32_copy(weights)


def consolidated_weights(directory: Path) -> dict:
    """The fp32 weights of a ZeRO checkpoint directory, merged from every rank's partition.

    DeepSpeed's zero_to_fp32 reads its files with weights_only=False. Before handing them over,
    every file is scanned (without unpickling) for types outside torch's safe set and
    CHECKPOINT_CLASSES, so nothing runs that weights_only=True would have refused.
    """
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in CHECKPOINT_CLASSES}
    for file in sorted((directory / TAG).glob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - allowed
        except Exception as e:  # a truncated or foreign file: name it instead of a traceback
            raise ValueError(f"{file} is not a readable torch checkpoint file ({type(e).__name__}: {e})") from None
        if unsafe:
            raise ValueError(
                f"{file} contains types a weights-only load refuses ({', '.join(sorted(unsafe))}); not loading it"
            )
    return fp32_copy(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG))


def _one_rank_job_environment() -> None:
    """DeepSpeed needs a process group even for one process: describe a one-rank torchrun job."""
    for name, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(dist.free_port()),
    }.items():
        os.environ.setdefault(name, value)
