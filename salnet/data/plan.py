"""The data order: a pure function of (seed, epoch, world size, workers) and the manifests' counts.

No I/O and no torch here, so every rank and every worker computes the same plan independently,
and a resumed run recomputes exactly the plan of the interrupted one.

Train epoch, step by step:

1. Pieces. Each train set contributes its per-epoch quota of samples: whole passes over its
   shards in a fresh random shard order each pass, then part of one more pass (whole shards in
   random order, the last one cut short). All pieces of all sets are then shuffled together.
   Laid end to end they form the epoch's sample sequence of N positions, which then starts at a
   random position (drawn anew each epoch) and wraps around: the piece holding it is cut in two.
2. Ranks. Rank r owns positions [r*N//world, (r+1)*N//world) and uses the first
   steps_per_epoch * batch_size of them, steps_per_epoch = (N // world) // batch_size: the same on
   every rank for any number of shards. The unused tail (at most batch_size samples per rank,
   world_size * batch_size in all) is the epoch's remainder. Without the random start the
   remainder would fall at the same places of the same pieces whenever the shuffle has little to
   shuffle (one shard of 10 in batches of 4: samples 8 and 9 in every epoch); with it, each
   sample of the sequence has the same chance, remainder / N, of being left out, whatever the shards.
3. Readers. A rank's batch j is made by its reader j % workers (the order in which a DataLoader
   collects from its workers), so reader w owns a contiguous run of its rank's range, one batch
   per batch it makes. Readers may start and stop inside a shard: with fewer shards than readers
   they share shards by disjoint sample ranges, never by duplicating samples.
4. Shuffle. Each reader emits its run in the order of a shuffle buffer of `shuffle_buffer`
   samples, simulated here on positions, so the order is known before a byte is read.

Resume: the first k emitted positions of a reader are what it consumed; the rest is read again
from the tars, skipping consumed members without reading their data.

Val: sets and shards in manifest order, no shuffle; rank r gets [r*V//world, (r+1)*V//world)
(its `share`), cut into batches (the last one short), so every sample is seen exactly once across
ranks. A rank's loader workers take contiguous shares of its batches, so each reads its samples in
one forward pass. `python -m salnet.predict` cuts its images among ranks and workers the same way.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Distinct first words keep the random streams for the different decisions independent.
_PIECES, _SHUFFLE, _SCALE, _AUGMENT, _DEVICE_AUGMENT, _START = 1, 2, 3, 4, 5, 6
# The version of the order (seed, epoch, world size, workers) give; part of a checkpoint's data
# identity, so a checkpoint of another version restarts at its next epoch instead of skipping the
# wrong samples. 2: the sequence starts at a random position each epoch.
PLAN_VERSION = 2
_WORD = 2**64 - 1


def rng_for(*words: int) -> np.random.Generator:
    return np.random.default_rng([w & _WORD for w in words])  # & maps negative seeds to valid words


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard `shard` (an index into the caller's flat shard table)."""

    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def set_quotas(set_sizes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """Samples each set contributes per epoch: all of them, or the weighted share of the total."""
    if weights is None:
        return list(set_sizes)
    total = sum(set_sizes)
    return [round(total * w / sum(weights)) for w in weights]


def slice_pieces(pieces: Sequence[Piece], starts: Sequence[int], lo: int, hi: int) -> list[Piece]:
    """The pieces covering positions [lo, hi) of the sequence `pieces` (starts: their first positions)."""
    out = []
    k = max(bisect.bisect_right(starts, lo) - 1, 0)
    while k < len(pieces) and starts[k] < hi:
        piece = pieces[k]
        first = piece.start + max(lo - starts[k], 0)
        last = piece.start + min(hi - starts[k], piece.size)
        if last > first:
            out.append(Piece(piece.shard, first, last))
        k += 1
    return out


def piece_starts(pieces: Sequence[Piece]) -> list[int]:
    return np.concatenate([[0], np.cumsum([p.size for p in pieces], dtype=np.int64)[:-1]]).tolist() if pieces else []


def buffered_shuffle(n: int, buffer: int, rng: np.random.Generator) -> list[int]:
    """The output order of a shuffle buffer of size `buffer` fed positions 0..n-1.

    A reader that reads its stream forward and emits in this order never holds more than `buffer`
    samples at once, like webdataset's shuffle, but the order is known in advance.
    """
    draws = rng.random(n)
    held: list[int] = []
    order: list[int] = []
    for position in range(n):
        if len(held) < buffer:
            held.append(position)
            continue
        k = int(draws[position] * len(held))
        order.append(held[k])
        held[k] = position
    order.extend(held[i] for i in rng.permutation(len(held)))
    return order


@dataclass(frozen=True)
class ReaderPlan:
    pieces: list[Piece]  # what the reader reads, in order; positions 0..n-1 run through them
    order: list[int]  # the positions in emission order; batch i of this reader is order[i*B:(i+1)*B]
    batches: list[int]  # the rank-level index of each batch this reader makes


class TrainPlan:
    """Which samples each (rank, reader) turns into which batches in each epoch."""

    def __init__(
        self,
        shard_sizes: Sequence[Sequence[int]],
        weights: Sequence[float] | None,
        *,
        batch_size: int,
        world_size: int,
        readers: int,
        seed: int,
        shuffle_buffer: int,
    ):
        if not 1 <= readers:
            raise ValueError(f"a rank needs at least one reader, got {readers}")
        self.shard_sizes = [list(sizes) for sizes in shard_sizes]
        self.quotas = set_quotas([sum(sizes) for sizes in self.shard_sizes], weights)
        self.batch_size, self.world_size, self.readers = batch_size, world_size, readers
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch_samples = sum(self.quotas)
        self.steps_per_epoch = (self.epoch_samples // world_size) // batch_size
        # Flat shard numbering: set 0's shards first, then set 1's, ...
        self._first_shard = np.concatenate([[0], np.cumsum([len(s) for s in self.shard_sizes])]).tolist()

    @property
    def remainder(self) -> int:
        """Samples of the epoch's sequence that no rank uses (different ones every epoch)."""
        return self.epoch_samples - self.world_size * self.steps_per_epoch * self.batch_size

    def pieces(self, epoch: int) -> list[Piece]:
        rng = rng_for(_PIECES, self.seed, epoch)
        pieces = []
        for s, (sizes, quota) in enumerate(zip(self.shard_sizes, self.quotas)):
            first = self._first_shard[s]
            passes, rest = divmod(quota, sum(sizes)) if sum(sizes) else (0, 0)
            for _ in range(passes):
                pieces += [Piece(first + i, 0, sizes[i]) for i in rng.permutation(len(sizes))]
            for i in rng.permutation(len(sizes)):
                if rest == 0:
                    break
                take = min(rest, sizes[i])
                pieces.append(Piece(first + i, 0, take))
                rest -= take
        pieces = [pieces[k] for k in rng.permutation(len(pieces))]
        start = int(rng_for(_START, self.seed, epoch).integers(self.epoch_samples)) if self.epoch_samples else 0
        starts = piece_starts(pieces)
        return slice_pieces(pieces, starts, start, self.epoch_samples) + slice_pieces(pieces, starts, 0, start)

    def reader_batches(self, reader: int) -> list[int]:
        return list(range(reader, self.steps_per_epoch, self.readers))

    def reader(self, epoch: int, rank: int, reader: int) -> ReaderPlan:
        if not (0 <= rank < self.world_size and 0 <= reader < self.readers):
            raise ValueError(
                f"rank {rank} / reader {reader} outside world size {self.world_size} x {self.readers} readers"
            )
        batches = self.reader_batches(reader)
        before = sum(len(self.reader_batches(w)) for w in range(reader)) * self.batch_size
        lo = rank * self.epoch_samples // self.world_size + before
        n = len(batches) * self.batch_size
        pieces = self.pieces(epoch)
        mine = slice_pieces(pieces, piece_starts(pieces), lo, lo + n)
        order = buffered_shuffle(n, self.shuffle_buffer, rng_for(_SHUFFLE, self.seed, epoch, rank, reader))
        return ReaderPlan(mine, order, batches)

    def consumed_by(self, reader: int, batches_done: int) -> int:
        """How many of its batches `reader` has made once the rank has taken `batches_done`."""
        return len(range(reader, batches_done, self.readers))

    def image_size(self, epoch: int, batch: int, sizes: Sequence[int]) -> int:
        # Not seeded by rank: all ranks train at the same size at each step, so none waits for another.
        return sizes[int(rng_for(_SCALE, self.seed, epoch, batch).integers(len(sizes)))]

    def augment_seed(self, epoch: int, rank: int, batch: int) -> int:
        return int(rng_for(_AUGMENT, self.seed, epoch, rank, batch).integers(2**63))


def device_augment_seed(seed: int, rank: int) -> int:
    """The seed of a rank's device-side augmentation generator (data.augment_on=device), which then
    runs on from batch to batch (its state is checkpointed)."""
    return int(rng_for(_DEVICE_AUGMENT, seed, rank).integers(2**63))


def val_batches(
    total: int, world_size: int, rank: int, batch_size: int, pad_to: int | None = None
) -> list[tuple[int, int] | None]:
    """This rank's val batches as position ranges [lo, hi); None marks a padding batch up to `pad_to`."""
    mine = range(total)[share(total, world_size, rank)]
    batches: list[tuple[int, int] | None] = [(b, min(b + batch_size, mine.stop)) for b in mine[::batch_size]]
    return batches + [None] * max((pad_to or 0) - len(batches), 0)


def val_batch_count(total: int, world_size: int, batch_size: int) -> int:
    """The most batches any rank has: what padding evens every rank up to."""
    return max(len(val_batches(total, world_size, r, batch_size)) for r in range(world_size))


def share(count: int, parts: int, part: int) -> slice:
    """Part `part` of a sequence of `count` items cut into `parts` contiguous blocks whose lengths
    differ by at most one: every item is in exactly one part, and the parts keep the order."""
    return slice(part * count // parts, (part + 1) * count // parts)
