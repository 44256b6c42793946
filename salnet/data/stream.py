"""TrainStream and ValStream: the plan (plan.py) read (reader.py), decoded (transforms.py) and
augmented or cut for the device (augment.py) by DataLoader workers, as uint8 batches.

Each DataLoader worker is one of the plan's readers. A DataLoader collects batches from its
workers in turn, starting with worker 0, so batch j of an epoch comes from worker j % workers;
after a resume at batch k the workers take the readers' roles rotated by k, and the batches still
arrive in the order of the uninterrupted run.

What the streams hand out is typed: `TrainBatch` and `ValBatch`. They are TypedDicts, i.e. plain
dicts at run time, because the DataLoader's pin_memory (and its conversion of worker output)
rebuilds dicts and named tuples with every tensor pinned but passes any other object, a dataclass
for one, through unpinned.

On CUDA the batches arrive in pinned memory and the train stream copies each one to the device
one batch ahead, on a stream of its own, so the copy overlaps the step on the batch before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import traceback
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, TypedDict, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from salnet import dist
from salnet.config import DataConfig
from salnet.data.augment import augment_sample, crop_box, cut, draw_warp, pad_crops, resolve_augment_on
from salnet.data.plan import PLAN_VERSION, TrainPlan, share, val_batch_count, val_batches
from salnet.data.reader import RawSample, in_order, read_positions, read_sequence
from salnet.data.sources import DataError, Limits, Shard, open_shard_set
from salnet.data.transforms import SampleError, decode_sample, resize_for_eval
from salnet.run.preemption import ignore_stop_signals, kill_daemonic_children_at_exit
from salnet.shards.parallel import available_cpus, too_many_workers

log = logging.getLogger("salnet.data")

T = TypeVar("T")


class _Batch(TypedDict):
    image: torch.Tensor  # uint8 [B, 3, S, S], S = data.size or this batch's data.multiscale size (device: see below)
    mask: torch.Tensor  # uint8 [B, 1, S, S], 0..255 (soft values kept)
    key: list[str]  # the B samples' keys


class TrainBatch(_Batch, total=False):
    """One training batch, as `TrainStream.epoch_batches` yields it.

    With data.augment_on=device it also has `extent` and `size`: then `image` and `mask` hold the
    samples' crop boxes as cut (uint8 [B, C, Hp, Wp], each crop at the top left, zeros around it),
    which TrainInput warps to `size` on the device. (TypedDict's total=False: NotRequired needs 3.11.)
    """

    extent: torch.Tensor  # int64 [B, 2]: each crop's height and width
    size: int  # the side the device warps the batch to


class ValBatch(TypedDict):
    """One validation batch, as iterating a `ValStream` yields it."""

    image: torch.Tensor  # uint8 [B, 3, S, S], S = data.eval_size; zeros [1, 3, S, S] when `pad`
    masks: list[torch.Tensor]  # uint8 [H, W] each, at the size stored (sizes differ, hence a list); [] when `pad`
    key: list[str]  # the B samples' keys; [] when `pad`
    pad: bool  # a padding batch: a forward pass that scores nothing (ValStream's pad_to_equal)


class _FromWorker(NamedTuple):
    """What a worker hands over: the batch, and why each corrupt sample skipped on the way was skipped.

    The stream logs and counts `skipped` and yields only `batch`, so the batch holds exactly its
    TypedDict's keys. A named tuple, not a dataclass: pin_memory pins inside named tuples.
    """

    batch: TrainBatch | ValBatch
    skipped: list[str]


def default_workers() -> int:
    """CPUs per rank minus one for the training process itself, at most 8.

    torchrun's ranks share the node's CPU set (LOCAL_WORLD_SIZE of them); under srun each task
    usually has its own CPU set already.
    """
    per_rank = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_rank - 1))


def worker_count(requested: int | None) -> int:
    """The loader processes per rank: default_workers() for None; a count far above the CPUs is
    refused (salnet.shards.parallel.too_many_workers), not capped: a train loader's workers are
    part of the data order."""
    if requested is None:
        return default_workers()
    problem = too_many_workers(requested)
    if problem:
        raise DataError(f"data.workers (or the --workers of predict and evaluate) = {requested}: {problem}; lower it")
    return requested


def loader_workers(requested: int | None, work: int) -> int:
    """Loader processes for `work` items (a rank's val batches, its images to predict): as many as
    requested (worker_count), but no more than there are items."""
    return min(worker_count(requested), work)


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def worker_share(items: Sequence[T]) -> Sequence[T]:
    """This DataLoader worker's contiguous share of its rank's `items` (plan.share; all of them when
    the rank's own process reads): worker w makes the w-th block, so each reads in one forward pass."""
    slot, slots = _worker_slot()
    return items[share(len(items), slots, slot)]


def _loader(dataset: IterableDataset, workers: int, cfg: DataConfig, device: torch.device) -> DataLoader:
    # A generator of its own: otherwise every new iterator draws its base seed from torch's global
    # RNG, and a resumed run (one iterator fewer) would continue one draw behind. Augmentation is
    # seeded per batch from the plan, so this seed decides nothing.
    # Workers ignore the stop signals Slurm sends to every process of a job: the training process
    # decides when to stop (salnet.run.preemption), and its workers go when it does. So SIGTERM cannot
    # end them at exit either: whatever process holds this loader (a test, a benchmark, not only
    # the trainer) kills them then, or a loader still referenced at exit would hang it.
    if workers:
        kill_daemonic_children_at_exit()
    # Pinned memory only for a CUDA device: only there does it make the copy asynchronous.
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_stop_signals,
        prefetch_factor=cfg.prefetch if workers else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
    )


def _one_pass(loader: DataLoader) -> Iterator[_FromWorker]:
    """One pass over `loader`. A worker's exception leaves it without the locals of the DataLoader's
    frames: torch re-raises it from a frame that references it, and that reference cycle would keep
    the failed iterator, and whatever the frames above hold (other streams), alive until the garbage
    collector runs, at some later moment; by then the iterator's queues are finalized, and its shutdown
    waits 5 s for each worker, sends SIGTERM (which our workers ignore, see _loader) and waits 5 s
    more. Without the cycle the workers go as soon as the exception and the stream do."""
    try:
        yield from loader
    except Exception as error:
        traceback.clear_frames(error.__traceback__)
        raise


def _decode_all(raws: Sequence[RawSample], on_error: str) -> tuple[list, list[str]]:
    """[(key, image, mask) or None for a corrupt sample], and what was skipped and why."""
    decoded, skipped = [], []
    for raw in raws:
        try:
            decoded.append((raw.key, *decode_sample(raw)))
        except SampleError as e:
            if on_error == "error":
                raise DataError(
                    f"{e} (data.on_error=error; data.on_error=skip logs and skips corrupt samples)"
                ) from None
            decoded.append(None)
            skipped.append(str(e))
    return decoded, skipped


class _SkipReport:
    """Logs each skipped sample as its batch arrives, and the count when the pass is over."""

    def __init__(self):
        self.messages: list[str] = []
        self.earlier = 0  # skipped before a resume, in the same epoch

    def reset(self, earlier: int = 0) -> None:
        self.messages, self.earlier = [], earlier

    def add(self, messages: list[str]) -> None:
        for message in messages:
            log.warning("data: skipped a corrupt sample (data.on_error=skip): %s", message)
        self.messages += messages

    @property
    def count(self) -> int:
        return self.earlier + len(self.messages)

    def report(self, what: str) -> None:
        if self.count:
            log.warning("data: %s: %d corrupt sample(s) skipped (data.on_error=skip)", what, self.count)


# --------------------------------------------------------------------------------------------
# Train
# --------------------------------------------------------------------------------------------


class _TrainBatches(IterableDataset):
    """One epoch of one rank, split among the DataLoader's workers; `control` = [epoch, first batch]."""

    def __init__(
        self, plan: TrainPlan, shards: list[Shard], cfg: DataConfig, rank: int, control: torch.Tensor, augment_on: str
    ):
        self.plan, self.shards, self.cfg, self.rank, self.control = plan, shards, cfg, rank, control
        self.augment_on = augment_on

    def __iter__(self) -> Iterator[_FromWorker]:
        epoch, first = (int(v) for v in self.control.tolist())  # shared memory: set by the main process per epoch
        slot, slots = _worker_slot()
        yield from self.reader_batches(epoch, reader=(slot + first) % slots, rank_batches_done=first)

    def reader_batches(self, epoch: int, reader: int, rank_batches_done: int) -> Iterator[_FromWorker]:
        plan, size = self.plan, self.plan.batch_size
        todo = plan.reader(epoch, self.rank, reader)
        done = plan.consumed_by(reader, rank_batches_done)
        order = todo.order[done * size :]
        samples = in_order(order, read_positions(self.shards, todo.pieces, sorted(order)))
        for batch in todo.batches[done:]:
            yield self.make_batch(epoch, batch, [next(samples) for _ in range(size)])

    def make_batch(self, epoch: int, batch: int, raws: list[RawSample]) -> _FromWorker:
        decoded, skipped = _decode_all(raws, self.cfg.on_error)
        good = [d for d in decoded if d is not None]
        if not good:
            raise DataError(
                f"rank {self.rank}, epoch {epoch}, batch {batch}: all {len(raws)} samples are corrupt "
                f"(data.on_error=skip needs at least one good sample per batch): {'; '.join(skipped)}"
            )
        # A skipped sample's slot goes to a good sample of the same batch (augmented afresh): the batch
        # keeps its size and every rank its step count.
        filled = [d if d is not None else good[i % len(good)] for i, d in enumerate(decoded)]
        size = self.plan.image_size(epoch, batch, self.cfg.multiscale) if self.cfg.multiscale else self.cfg.size
        aug, keys = self.cfg.augment, [d[0] for d in filled]
        # Seeded per batch, so a resumed run augments exactly as the uninterrupted one; fork_rng keeps
        # the training process's own RNG untouched when there are no worker processes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.plan.augment_seed(epoch, self.rank, batch))
            boxes = [crop_box(image, aug) for _, image, _ in filled]
            warp = draw_warp(len(filled), aug) if self.augment_on == "worker" else None
        crops = [cut(image, mask, box, size) for (_, image, mask), box in zip(filled, boxes)]
        if warp is None:  # augment_on=device: the crops as cut; TrainInput warps them on the device
            images, masks, extent = pad_crops([image for image, _ in crops], [mask for _, mask in crops])
            return _FromWorker(TrainBatch(image=images, mask=masks, key=keys, extent=extent, size=size), skipped)
        images = torch.empty(len(crops), 3, size, size, dtype=torch.uint8)
        masks = torch.empty(len(crops), 1, size, size, dtype=torch.uint8)
        for i, (image, mask) in enumerate(crops):
            augment_sample(image, mask, warp.select(slice(i, i + 1)), images[i], masks[i])
        return _FromWorker(TrainBatch(image=images, mask=masks, key=keys), skipped)


class TrainStream:
    """This rank's training batches, epoch by epoch, with exact mid-epoch resume.

    `epoch_batches(epoch)` yields exactly `steps_per_epoch` TrainBatches (fewer only when resuming
    inside that epoch): {"image": uint8 [B, 3, S, S], "mask": uint8 [B, 1, S, S], "key": [B keys]}.
    """

    def __init__(self, cfg: DataConfig, seed: int, rank: int, world_size: int, device: torch.device | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        sets = [open_shard_set(location, Limits(cfg.max_member_bytes, cfg.max_pixels)) for location in cfg.train]
        self.cfg, self.rank = cfg, rank
        self.device = dist.device() if device is None else torch.device(device)  # the training device
        self.augment_on = resolve_augment_on(cfg, self.device)
        self.workers = worker_count(cfg.workers)
        self.plan = TrainPlan(
            [[shard.samples for shard in s.shards] for s in sets],
            cfg.train_weights,
            batch_size=cfg.batch_size,
            world_size=world_size,
            readers=max(1, self.workers),
            seed=seed,
            shuffle_buffer=cfg.shuffle_buffer,
        )
        if self.plan.steps_per_epoch == 0:
            raise DataError(
                f"{self.plan.epoch_samples} train samples per epoch ({', '.join(cfg.train)}) make less than one "
                f"batch of data.batch_size={cfg.batch_size} on each of {world_size} ranks"
            )
        layout = json.dumps([[s.name, [shard.samples for shard in s.shards]] for s in sets] + [self.plan.quotas])
        self._identity = {
            "plan": PLAN_VERSION,
            "seed": seed,
            "world_size": world_size,
            "workers": self.workers,
            "batch_size": cfg.batch_size,
            "shuffle_buffer": cfg.shuffle_buffer,
            "data": hashlib.sha1(layout.encode()).hexdigest()[:16],
        }
        self._control = torch.zeros(2, dtype=torch.int64).share_memory_()
        shards = [shard for s in sets for shard in s.shards]
        self._batches = _TrainBatches(self.plan, shards, cfg, rank, self._control, self.augment_on)
        self._loader = _loader(self._batches, self.workers, cfg, self.device)
        self._epoch, self._done = 0, 0
        self._resume: tuple[int, int, int] | None = None  # (epoch, batches done, skipped so far)
        self.skips = _SkipReport()

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def skipped(self) -> list[str]:
        """Why each sample skipped so far in the current epoch (this session) was skipped."""
        return self.skips.messages

    def epoch_batches(self, epoch: int) -> Iterator[TrainBatch]:
        first, earlier_skips = self._resume_point(epoch)
        self._epoch, self._done = epoch, first
        self.skips.reset(earlier_skips)
        if first >= self.steps_per_epoch:
            return
        self._control[0], self._control[1] = epoch, first
        for batch, skipped in _ahead_on_device(_one_pass(self._loader), self.device):
            self.skips.add(skipped)
            self._done += 1  # counted before the yield: a state_dict() taken after this batch includes it
            yield batch
        self.skips.report(f"rank {self.rank}, epoch {epoch}")

    def worker_batch(self, epoch: int, batch: int, raws: list[RawSample]) -> TrainBatch:
        """What a loader worker makes of batch `batch` of `epoch` from its raw samples, done in this
        process (for benchmarks: the workers' CPU cost per sample)."""
        return self._batches.make_batch(epoch, batch, raws).batch

    def _resume_point(self, epoch: int) -> tuple[int, int]:
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == epoch:
            return resume[1], resume[2]
        if resume is not None and resume[0] > epoch:
            self._resume = resume  # not there yet: keep it for its epoch
        return 0, 0

    def state_dict(self) -> dict:
        """What this rank has consumed (epoch, batches in it) and the identity of the plan it followed."""
        return {"epoch": self._epoch, "batches": self._done, "skipped": self.skips.count, **self._identity}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next `epoch_batches(state["epoch"])` continues after the consumed batches.

        If the plan changed (world size, workers, seed, batch size, shuffle buffer, the data, or
        the version of the order itself: plan.PLAN_VERSION),
        the consumed batches cannot be mapped onto the new plan: the rest of that epoch is skipped
        and the data order restarts at the start of the next one.
        """
        epoch, done = int(state["epoch"]), int(state["batches"])
        changed = {key: (state.get(key), now) for key, now in self._identity.items() if state.get(key) != now}
        if changed:
            what = ", ".join(f"{key} {then!r} -> {now!r}" for key, (then, now) in changed.items())
            log.warning(
                "data: the data plan changed since the checkpoint (%s): rank %d skips the rest of epoch %d "
                "and restarts the data order at the start of epoch %d",
                what,
                self.rank,
                epoch,
                epoch + 1,
            )
            done = self.steps_per_epoch
        self._resume = (epoch, done, int(state.get("skipped", 0)))


def _ahead_on_device(items: Iterable[_FromWorker], device: torch.device) -> Iterator[_FromWorker]:
    """The items with their batches on a CUDA `device`, each copy issued one batch ahead on a side
    stream (from pinned memory, non-blocking) so it overlaps the step on the batch before; on any
    other device the items as they come (the step moves them)."""
    if device.type != "cuda":
        yield from items
        return
    copies = torch.cuda.Stream(device)

    def send(item: _FromWorker) -> tuple[_FromWorker, torch.cuda.Event]:
        with torch.cuda.stream(copies):
            batch = {
                k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in item.batch.items()
            }
            return item._replace(batch=batch), copies.record_event()

    def ready(item: _FromWorker, copied: torch.cuda.Event) -> _FromWorker:
        # The step's stream waits for this batch's copy only (not for the next one, issued since),
        # and the allocator learns the tensors are used there, so it does not recycle them early.
        current = torch.cuda.current_stream(device)
        current.wait_event(copied)
        for value in item.batch.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(current)
        return item

    ahead = None
    for item in items:
        sent = send(item)
        if ahead is not None:
            yield ready(*ahead)
        ahead = sent
    if ahead is not None:
        yield ready(*ahead)


# --------------------------------------------------------------------------------------------
# Val
# --------------------------------------------------------------------------------------------


class _ValBatches(IterableDataset):
    """This rank's val batches (position ranges, None for padding); each worker makes its worker_share."""

    def __init__(self, shards: list[Shard], batches: list[tuple[int, int] | None], cfg: DataConfig):
        self.shards, self.batches, self.cfg = shards, batches, cfg

    def __iter__(self) -> Iterator[_FromWorker]:
        batches = worker_share(self.batches)
        real = [b for b in batches if b is not None]  # contiguous positions: read them in one pass
        samples = read_sequence(self.shards, range(real[0][0], real[-1][1]) if real else ())
        for batch in batches:
            yield (
                self.pad_batch([])
                if batch is None
                else self.make_batch([next(samples) for _ in range(batch[1] - batch[0])])
            )

    def make_batch(self, raws: list[RawSample]) -> _FromWorker:
        decoded, skipped = _decode_all(raws, self.cfg.on_error)
        good = [d for d in decoded if d is not None]
        if not good:
            return self.pad_batch(skipped)  # still one forward pass, as the batch count promised
        return _FromWorker(
            ValBatch(
                image=torch.stack([resize_for_eval(image, self.cfg.eval_size) for _, image, _ in good]),
                masks=[mask[0] for _, _, mask in good],
                key=[key for key, _, _ in good],
                pad=False,
            ),
            skipped,
        )

    def pad_batch(self, skipped: list[str]) -> _FromWorker:
        size = self.cfg.eval_size
        return _FromWorker(
            ValBatch(image=torch.zeros(1, 3, size, size, dtype=torch.uint8), masks=[], key=[], pad=True), skipped
        )


class ValStream:
    """This rank's share of the val sets; every val sample exactly once across ranks.

    Iterating yields ValBatches: {"image": uint8 [B, 3, S, S] (S = data.eval_size), "masks": [uint8
    [H, W] as stored], "key": [B keys], "pad": False}. With `pad_to_equal` every rank gets the same
    number of batches: the extra ones are {"image": zeros [1, 3, S, S], "masks": [], "key": [],
    "pad": True}, forward passes that score nothing (for strategies whose collectives need them,
    e.g. ZeRO-3).
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, pad_to_equal: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        limits = Limits(cfg.max_member_bytes, cfg.max_pixels)
        shards = [shard for location in cfg.val for shard in open_shard_set(location, limits).shards]
        total = sum(shard.samples for shard in shards)
        pad_to = val_batch_count(total, world_size, cfg.eval_batch_size) if pad_to_equal else None
        batches = val_batches(total, world_size, rank, cfg.eval_batch_size, pad_to)
        self.num_batches = len(batches)
        self.samples = sum(b[1] - b[0] for b in batches if b is not None)
        workers = loader_workers(cfg.workers, len(batches))
        self._loader = _loader(_ValBatches(shards, batches, cfg), workers, cfg, dist.device())
        self.skips = _SkipReport()
        self.rank = rank

    def __len__(self) -> int:
        return self.num_batches

    @property
    def skipped(self) -> list[str]:
        return self.skips.messages

    def __iter__(self) -> Iterator[ValBatch]:
        self.skips.reset()
        for batch, skipped in _one_pass(self._loader):
            self.skips.add(skipped)
            yield batch
        self.skips.report(f"rank {self.rank}, validation")
