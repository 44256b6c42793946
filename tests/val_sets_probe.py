"""Named validation sets under torchrun (or one process): rank 0 writes the Validator's scores as JSON.

torchrun --nproc_per_node N tests/val_sets_probe.py CONFIG.yaml OUT.json
"""

import json
import sys

import torch

from salnet import dist
from salnet.config import load_config
from salnet.model import build_model
from salnet.strategy.base import predict_logits
from salnet.validate import Validator

if __name__ == "__main__":
    torch.set_num_threads(1)
    with dist.distributed():
        cfg = load_config(sys.argv[1])
        torch.manual_seed(0)  # the same random network on every rank
        model = build_model(cfg.model).to(memory_format=torch.channels_last)
        scores = Validator(cfg, dist.rank(), dist.world_size())(lambda images: predict_logits(model, images))
        if dist.is_main():
            with open(sys.argv[2], "w") as f:
                json.dump(scores, f)
