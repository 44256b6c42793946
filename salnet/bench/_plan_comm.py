"""The time side of `python -m salnet.bench plan`: collectives per optimizer step against compute.

Collectives are timed from their message sizes alone (the bandwidth term of a ring; the latency
term, 2 (n - 1) hops per bucket of a few microseconds each, is left out), with every message in
float32 (salnet keeps float32 weights and gradients under bf16 autocast):
- all-reduce of S bytes over n ranks: 2 (n - 1) / n x S / B; reduce-scatter and all-gather:
  (n - 1) / n x S / B each (a ring moves that much through every rank's link).
- DDP: one all-reduce of the gradients per optimizer step (no_sync on the other micro-batches).
- ZeRO-1/2: a reduce-scatter of the gradients (DeepSpeed reduces every micro-batch's) and an
  all-gather of the updated weights after the step: together an all-reduce's traffic.
- ZeRO-3: an all-gather of the weights in forward and again in backward, per micro-batch, and a
  reduce-scatter of the gradients: 1.5x DDP's traffic (the ZeRO paper's count; DeepSpeed's defaults
  may keep gathered weights for backward, which saves the second gather and costs memory).
- Overlap: DDP all-reduces gradient buckets while backward runs; DeepSpeed does so with
  zero_optimization.overlap_comm (its default: on for ZeRO-3, off for ZeRO-1/2; the
  `deepspeed:` section may set it). The weights' all-gather after the step and ZeRO-3's forward
  gathers are counted as exposed. The step time is compute + exposed + what of the overlapped
  collectives exceeds the backward pass (about 2/3 of a step's compute).
- B: within one node, a GPU's NVLink bandwidth; across nodes, the smaller of that and a node's
  network bandwidth: NCCL runs one ring per NIC, each entering and leaving every node once, so
  a node's NICs together carry 2 (n - 1) / n x S each way, as each GPU's NVLink does.

Compute per step is micro-batch x grad_accum / (per-GPU training images/s): stated with
--throughput (what `python -m salnet.bench gpu` measures), or from --tflops (achieved per GPU) and the
network's training FLOPs per image (salnet.model.cost: 3x one training-mode forward), or by default
from an assumed MFU of the stated peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from salnet.bench._plan_memory import zero_setting
from salnet.config import Config

GB = 1e9
BACKWARD_SHARE = 2 / 3  # of a step's FLOPs (salnet.model.cost.TRAIN_FLOPS_PER_FORWARD: forward 1, backward 2)


@dataclass(frozen=True)
class Network:
    """Bandwidths in GB/s (10^9 bytes), one direction: a GPU's NVLink, a node's NICs together."""

    intra_gbs: float
    inter_gbs: float

    def ring_gbs(self, nodes: int) -> float:
        """The bandwidth a ring over `nodes` nodes gets per rank (see the module's docstring)."""
        return self.intra_gbs if nodes == 1 else min(self.intra_gbs, self.inter_gbs)


def all_reduce_s(nbytes: float, world: int, gbs: float) -> float:
    return 2 * (world - 1) / world * nbytes / (gbs * GB)


def gather_or_scatter_s(nbytes: float, world: int, gbs: float) -> float:
    """An all-gather or a reduce-scatter of `nbytes` (the whole tensor, all ranks' pieces together)."""
    return (world - 1) / world * nbytes / (gbs * GB)


class Collective(NamedTuple):
    name: str
    seconds: float  # per optimizer step
    hidden_by_backward: bool  # runs while backward computes (its buckets are ready as backward goes)


def overlap_comm(cfg: Config) -> bool:
    """DeepSpeed's zero_optimization.overlap_comm as the run gets it: the pass-through's value, or
    DeepSpeed's default (on for ZeRO-3, off for ZeRO-1/2)."""
    return bool(zero_setting(cfg, "overlap_comm", cfg.train.zero_stage == 3))


def collectives(cfg: Config, params: int, world: int, gbs: float) -> list[Collective]:
    """The collectives of one optimizer step on `world` ranks (none on one)."""
    if world == 1:
        return []
    nbytes = params * 4
    if cfg.train.strategy == "ddp":
        return [Collective("all-reduce gradients", all_reduce_s(nbytes, world, gbs), True)]
    scatter = cfg.train.grad_accum * gather_or_scatter_s(nbytes, world, gbs)
    gradients = Collective("reduce-scatter gradients", scatter, overlap_comm(cfg))
    if cfg.train.zero_stage in (1, 2):
        return [gradients, Collective("all-gather weights", gather_or_scatter_s(nbytes, world, gbs), False)]
    # The forward's gathers come before the layers that need them; the backward's are prefetched in it.
    return [
        Collective("all-gather weights (forward)", scatter, False),
        Collective("all-gather weights (backward)", scatter, True),
        gradients,
    ]


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    collectives: tuple[Collective, ...]

    @property
    def comm_s(self) -> float:
        return sum(c.seconds for c in self.collectives)

    @property
    def step_s(self) -> float:
        """Compute, the collectives nothing hides, and what of the others does not fit under backward."""
        hidden = sum(c.seconds for c in self.collectives if c.hidden_by_backward)
        exposed = self.comm_s - hidden
        return self.compute_s + exposed + max(0.0, hidden - BACKWARD_SHARE * self.compute_s)


def step_time(cfg: Config, collectives: list[Collective], images_per_s: float) -> StepTime:
    compute = cfg.data.batch_size * cfg.train.grad_accum / images_per_s
    return StepTime(compute_s=compute, collectives=tuple(collectives))
