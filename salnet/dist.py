"""The only module that calls torch.distributed.

Three ways a salnet process can be started, detected in this order:

1. torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT);
2. srun or Submitit with no torchrun inside: Slurm's SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS,
   the first host of SLURM_JOB_NODELIST as the rendezvous host and a port derived from the job id
   (so concurrent jobs on one node do not collide);
3. a plain `python -m ...`: one process, no process group at all.

Slurm's values are exported as the torchrun variables before init, so everything downstream
(DeepSpeed included) sees one convention. Backend: nccl on CUDA, gloo on CPU. The process group
is created by `distributed()` and destroyed when it exits, errors included.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # "torchrun" | "slurm" | "single"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[03-05,9],cpu1' -> 'gpu03'.

    Slurm's own `scontrol show hostnames` does this, but the variable must be parsed on nodes and
    in tests where scontrol may be absent; only the first host is needed.
    """
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm node list (e.g. 'node[1-4]')")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous that only this host joins."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_port(job_id: str) -> int:
    # 20000..39999: above the common service ports, below the Linux ephemeral range.
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    def need_int(name: str) -> int:
        try:
            return int(environ[name])
        except (KeyError, ValueError):
            raise RuntimeError(f"environment variable {name}={environ.get(name)!r}: expected an integer") from None

    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=need_int("RANK"),
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            world_size=need_int("WORLD_SIZE"),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_JOB_ID" in environ:
        # Inside `srun` a step may use fewer tasks than the allocation: the step's count wins.
        world = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"
        return DistEnv(
            rank=need_int("SLURM_PROCID"),
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            world_size=int(world),
            master_addr=environ.get("MASTER_ADDR") or first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(environ.get("MASTER_PORT") or slurm_port(environ["SLURM_JOB_ID"])),
            launcher="slurm",
        )
    return DistEnv()


# --------------------------------------------------------------------------------------------
# Process group life cycle
# --------------------------------------------------------------------------------------------

_DEVICE = torch.device("cpu")


def device() -> torch.device:
    """This rank's device: cuda:<local_rank> when CUDA is present, else cpu."""
    return _DEVICE


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def backend() -> str | None:
    return tdist.get_backend() if is_initialized() else None


def init(timeout_s: float = 1800, use_cuda: bool | None = None) -> DistEnv:
    """Join the job's process group (if there is more than one process) and pick the device."""
    global _DEVICE
    found = detect_env()
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if use_cuda:
        torch.cuda.set_device(found.local_rank)
        _DEVICE = torch.device("cuda", found.local_rank)
    else:
        _DEVICE = torch.device("cpu")
    if found.world_size > 1 and not is_initialized():
        # Export the torchrun convention so that env:// (and DeepSpeed) read the same values.
        os.environ.update(
            RANK=str(found.rank),
            LOCAL_RANK=str(found.local_rank),
            WORLD_SIZE=str(found.world_size),
            MASTER_ADDR=found.master_addr,
            MASTER_PORT=str(found.master_port),
        )
        timeout = datetime.timedelta(seconds=timeout_s)

        def join() -> None:
            if use_cuda:
                torch.cuda.set_device(found.local_rank)  # the current device is per thread
            tdist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                rank=found.rank,
                world_size=found.world_size,
                timeout=timeout,
                device_id=_DEVICE if use_cuda else None,
                **_rendezvous(found, timeout),
            )

        _signal_aware(join)
    return found


def _signal_aware(fn: Callable[[], None]) -> None:
    """fn() in a helper thread while the main thread waits in Python.

    The rendezvous blocks in C++ (the store's connect retries, the wait for the other ranks) for up to
    train.timeout_s, and Python runs signal handlers only between bytecodes of the main thread: a
    rank whose launcher died there would ignore SIGTERM for half an hour. Waiting here instead, the
    handlers run at once, and one that raises (salnet.run.preemption: a stop before the first step)
    ends the wait; the helper thread is a daemon and dies with the process."""
    if threading.current_thread() is not threading.main_thread():
        fn()
        return
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the main thread, which raises it as its own
            failure.append(e)

    helper = threading.Thread(target=run, name="salnet-rendezvous", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.1)
    if failure:
        raise failure[0]


# The key in torchrun's agent store where rank 0 says where this attempt's own store is.
_ATTEMPT_STORE_KEY = "salnet/attempt-store"


def _rendezvous(found: DistEnv, timeout: datetime.timedelta) -> dict:
    """env:// normally; under torchrun's shared agent store, a store of this attempt's own.

    torchrun (agent store sharing, its default) keeps its key-value store across restarts, and the
    restarted ranks would read the gloo addresses the dead attempt published there (connections
    refused, the restart fails). TORCHELASTIC_RESTART_COUNT does not name the attempt across nodes:
    each agent counts its own restarts, and an agent that restarts its ranks because another node's
    rank failed counts none. So rank 0 hosts a fresh store for the process group and publishes its
    address in the agent's store with a nonce; the other ranks connect to what they find there and
    check the nonce. A dead attempt's entry points at a store that is gone (or holds another nonce):
    they read again until this attempt's rank 0 has written its own.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {"init_method": "env://"}
    agent = tdist.TCPStore(found.master_addr, found.master_port, found.world_size, is_master=False, timeout=timeout)
    if found.rank == 0:
        own = tdist.TCPStore(
            found.master_addr, 0, found.world_size, is_master=True, timeout=timeout, wait_for_workers=False
        )
        nonce = os.urandom(8).hex()
        own.set(_ATTEMPT_STORE_KEY, nonce)
        agent.set(_ATTEMPT_STORE_KEY, f"{own.port} {nonce}")
        return {"store": own}
    deadline = time.monotonic() + timeout.total_seconds()
    probe = datetime.timedelta(seconds=2)  # a dead attempt's port refuses at once; a live store answers at once
    while True:
        port, nonce = agent.get(_ATTEMPT_STORE_KEY).decode().split()  # waits until some attempt wrote it
        try:
            own = tdist.TCPStore(found.master_addr, int(port), found.world_size, is_master=False, timeout=probe)
            if own.get(_ATTEMPT_STORE_KEY).decode() == nonce:
                own.set_timeout(timeout)
                return {"store": own}
        except (RuntimeError, ValueError):  # refused, timed out (DistError is a RuntimeError)
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {found.rank}: rank 0 of this torchrun attempt did not publish its store at "
                f"{found.master_addr}:{found.master_port} within {timeout.total_seconds():.0f} s"
            )
        time.sleep(0.2)


def shutdown() -> None:
    if is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def distributed(timeout_s: float = 1800, use_cuda: bool | None = None) -> Iterator[DistEnv]:
    """`with distributed(...):` joins the process group and always leaves it, errors included.

    On an error the group is destroyed without a final barrier: the other ranks then fail their
    next collective (or hit the timeout) instead of waiting forever.
    """
    found = init(timeout_s=timeout_s, use_cuda=use_cuda)
    try:
        yield found
    finally:
        shutdown()


def seed_everything(seed: int) -> int:
    """Seed python, numpy and torch with a per-rank seed derived from the global one."""
    per_rank = seed + 1000003 * rank()
    random.seed(per_rank)
    np.random.seed(per_rank % 2**32)
    torch.manual_seed(per_rank)
    return per_rank


# --------------------------------------------------------------------------------------------
# Collectives and rank-0 helpers (no-ops in a single process)
# --------------------------------------------------------------------------------------------


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "avg": "AVG"}


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce in place. gloo has no AVG, so 'avg' is a sum divided by the world size."""
    if not is_initialized():
        return tensor
    if op == "avg":
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor.div_(world_size())
    tdist.all_reduce(tensor, op=getattr(tdist.ReduceOp, _OPS[op]))
    return tensor


def all_reduce_values(values: list[float], op: str = "sum") -> list[float]:
    """All-reduce a few host numbers in one collective (float64)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    return all_reduce_(t, op).tolist()


def all_reduce_scalar(value: float, op: str = "sum") -> float:
    return all_reduce_values([value], op)[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank: the way to agree before acting."""
    return all_reduce_scalar(1.0 if flag else 0.0, "max") > 0


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` with rank `src`'s, in place, on every rank."""
    if is_initialized():
        tdist.broadcast(tensor, src=src)
    return tensor


def all_gather_object(obj: Any) -> list:
    if not is_initialized():
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo only CPU ones.
    return _DEVICE if backend() == "nccl" else torch.device("cpu")


def rank_zero_only(fn: Callable) -> Callable:
    """Run `fn` on rank 0 only; other ranks get None."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None

    return wrapper


@rank_zero_only
def print0(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)
