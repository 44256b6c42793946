"""Run by test_dist.py under torchrun / Slurm variables / alone: joins the group, all-reduces,
prints what it saw as one JSON line per rank (and the config once, from rank 0)."""

import json
import sys

import torch

from salnet import dist
from salnet.config import parse_config, to_yaml

cfg = parse_config(sys.argv[1:], prog="dist_probe")
with dist.distributed(timeout_s=cfg.train.timeout_s) as env:
    dist.print0(to_yaml(cfg), end="")
    seed = dist.seed_everything(cfg.train.seed)
    t = torch.tensor([float(dist.rank() + 1)])
    dist.all_reduce_(t)
    agree = dist.any_rank(dist.rank() == dist.world_size() - 1)
    gathered = dist.all_gather_object(dist.rank())
    if cfg.name == "fail" and dist.rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()
    # One write per line (< PIPE_BUF): lines of the two ranks cannot interleave in the shared pipe.
    sys.stdout.write(
        json.dumps(
            {
                "rank": env.rank,
                "world": dist.world_size(),
                "launcher": env.launcher,
                "backend": dist.backend(),
                "sum": t.item(),
                "avg": dist.all_reduce_scalar(dist.rank(), "avg"),
                "any": agree,
                "gathered": gathered,
                "seed": seed,
                "device": str(dist.device()),
                "first_draw": torch.rand(1).item(),
            }
        )
        + "\n"
    )
    sys.stdout.flush()
sys.stdout.write(json.dumps({"initialized_after_exit": dist.is_initialized()}) + "\n")
