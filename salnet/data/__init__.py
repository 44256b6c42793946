"""The streaming loader: deterministic, rank-balanced, resumable input from WebDataset shards.

    train = TrainStream(cfg.data, seed, rank, world_size)   # train.steps_per_epoch batches per epoch, every rank
    for batch in train.epoch_batches(epoch): ...            # TrainBatch: {"image": uint8, "mask": uint8, "key": [...]}
    state = train.state_dict(); train.load_state_dict(state) # exact mid-epoch resume
    for batch in ValStream(cfg.data, rank, world_size): ... # ValBatch: {"image", "masks", "key", "pad"}; each val sample once
    image, target = TrainInput(cfg.data, device, channels_last)(batch)  # adjust input, on the device

Modules: sources (shard directories and URLs, manifests), plan (the order, a pure function),
reader (tar members to raw samples), transforms (decode, normalise), augment (crop box, one fused
warp of image and mask, colour jitter: the same maths in a worker or on the device, as
data.augment_on says), stream (the two streams, the TrainBatch and ValBatch they yield, their
DataLoader workers, the copy to the device one batch ahead), device_input (a train batch on the
device: augmented there with data.augment_on=device, the network's input and the loss's target).
"""

from salnet.data.device_input import TrainInput
from salnet.data.sources import DataError
from salnet.data.stream import TrainBatch, TrainStream, ValBatch, ValStream, default_workers
from salnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_model_input, to_target

__all__ = [
    "DataError",
    "TrainBatch",
    "TrainInput",
    "TrainStream",
    "ValBatch",
    "ValStream",
    "default_workers",
    "to_model_input",
    "to_target",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
