"""Read a reader's planned samples from tar shards as raw bytes, skipping the others unread.

Shards are read forward once (salnet.shards.tario): a compressed shard is refused from its first
bytes, a member above the source's `max_member_bytes` from its header, before its data is read.
Samples that are not wanted (another reader's, or consumed before a resume) are passed over
without their data being read, let alone decoded.

Every shard opened is read to its end, wanted samples or not, before its last wanted sample is
handed over: only so can a reader tell that the shard holds more samples than its manifest says,
whichever of its samples the epoch leaves out. Passing over the rest costs streaming its bytes
(no decoding): up to one shard per reader per epoch that would otherwise be closed early.

The reader holds every member name to the shard format (salnet.shards.format) as it passes:
a sample key that is not a valid key (a path, '', './KEY'), a key that comes back later in the
shard or a member repeated within a sample (a repeated key, whose members would overwrite the
first sample's), or a shard holding more or fewer samples than its manifest says stops the run
naming the shard and the member, key or counts, rather than silently dropping, merging or
repeating data or letting a key name a file elsewhere.
"""

from __future__ import annotations

import bisect
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from salnet.data.plan import Piece, piece_starts
from salnet.data.sources import DataError, Shard, open_shard
from salnet.imagecheck import DEFAULT_MAX_PIXELS
from salnet.shards.format import member_key_problem, split_member_name
from salnet.shards.tario import ShardTar, TarRefused


@dataclass
class RawSample:
    shard: str  # the shard's name, for messages
    index: int  # the sample's number within its shard
    key: str
    members: dict[str, bytes]  # extension after the key (salnet.shards.format: "jpg", "mask.png", ...) -> bytes
    max_pixels: int = (
        DEFAULT_MAX_PIXELS  # the source's limit (Limits.max_pixels), checked from each image header before decoding
    )

    def where(self) -> str:
        return f"shard {self.shard}, sample '{self.key}' (#{self.index})"


class _MemberSelector:
    """Checks each member name, numbers samples as their keys change and says which members to read.

    A member's key is its name up to the first dot, as the shard format (and webdataset) splits it.
    """

    def __init__(self, shard: Shard, wanted: Sequence[int]):
        self.shard, self.wanted, self.next_wanted = shard, wanted, 0
        self.index, self.key = -1, None
        self.numbers: dict[str, int] = {}  # key -> its sample number, to find a key that comes back
        self.exts: set[str] = set()  # the current sample's extensions

    def __call__(self, name: str) -> bool:
        """Whether to read the member (False: skip it unread)."""
        key, ext = split_member_name(name)
        if key != self.key:
            self._next_sample(name, key)
        elif ext in self.exts:
            raise DataError(
                f"shard {self.shard.name}: sample {key!r} (#{self.index}) has a second member {name!r}: the key is "
                "repeated within the shard, and the second sample would overwrite the first; repack, and run "
                "`python -m salnet.shards verify`"
            )
        self.exts.add(ext)
        return self.next_wanted < len(self.wanted) and self.wanted[self.next_wanted] == self.index

    def _next_sample(self, name: str, key: str) -> None:
        problem = member_key_problem(name)
        if problem:
            raise DataError(f"shard {self.shard.name}: {problem}; repack")
        if key in self.numbers:
            raise DataError(
                f"shard {self.shard.name}: sample key {key!r} occurs twice: samples #{self.numbers[key]} and "
                f"#{self.index + 1}; a key names one sample (and its map); repack, and run `python -m salnet.shards verify`"
            )
        self.key, self.index, self.exts = key, self.index + 1, set()
        self.numbers[key] = self.index
        if self.index >= self.shard.samples:
            raise DataError(
                f"shard {self.shard.name} holds more samples than its manifest says: sample #{self.index} "
                f"('{key}') follows the {self.shard.samples} it lists (the shard has at least {self.index + 1}, "
                f"the manifest says {self.shard.samples}); the shard was replaced or the manifest does not "
                "belong to it: repack, and run `python -m salnet.shards verify`"
            )
        while self.next_wanted < len(self.wanted) and self.wanted[self.next_wanted] < self.index:
            self.next_wanted += 1


def read_shard(shard: Shard, wanted: Sequence[int]) -> Iterator[RawSample]:
    """The samples numbered `wanted` (ascending) of `shard`, in that order. The whole shard is read
    (the unwanted members skipped unread) before the last of them is handed over, so a shard that
    does not hold what its manifest says stops the run, however few of its samples are wanted."""
    selector = _MemberSelector(shard, wanted)
    stream = open_shard(shard)
    sample, got, hang_up_quietly = None, 0, False
    try:
        tar = ShardTar(stream, shard.limits.max_member_bytes)
        for info in tar:
            if not info.isreg():
                continue
            if not selector(info.name):
                continue
            key, ext = split_member_name(info.name)
            if sample is None or sample.index != selector.index:
                if sample is not None:
                    yield sample
                    got += 1
                sample = RawSample(shard.name, selector.index, key, {}, shard.limits.max_pixels)
            sample.members[ext] = tar.read(info)
        # A curl or pipe: process that exits non-zero matters only if the shard came up short.
        hang_up_quietly = selector.index + 1 == shard.samples
    except GeneratorExit:
        hang_up_quietly = True  # the consumer stopped early (an epoch cut short); nothing is wrong with the shard
        raise
    except DataError:
        hang_up_quietly = True  # the content is at fault, said by the error; a cut-short reading process is not news
        raise
    except TarRefused as e:
        hang_up_quietly = True
        raise DataError(f"shard {shard.name} refused after {selector.index + 1} samples: {e}") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {shard.name} is unreadable after {selector.index + 1} samples: {e}") from None
    finally:
        _close(stream, shard, quiet=hang_up_quietly)
    if selector.index + 1 < shard.samples:
        found = got + (sample is not None)
        needed = f"the plan needs sample #{wanted[found]} and " if found < len(wanted) else ""
        raise DataError(
            f"shard {shard.name} ended after {selector.index + 1} samples, but {needed}its manifest says "
            f"{shard.samples}: the shard is truncated or was replaced; run `python -m salnet.shards verify`"
        )
    if sample is not None:
        yield sample


def _close(stream, shard: Shard, quiet: bool) -> None:
    # A curl or pipe: process exits non-zero when the reader hangs up early on purpose; that only
    # matters if the samples did not all arrive.
    try:
        stream.close()
    except OSError as e:
        if not quiet:
            raise DataError(f"shard {shard.name}: the reading process failed: {e}") from None


def read_positions(
    shards: Sequence[Shard], pieces: Sequence[Piece], positions: Iterable[int]
) -> Iterator[tuple[int, RawSample]]:
    """(position, sample) for the given ascending positions of the sequence laid out by `pieces`."""
    starts = piece_starts(pieces)
    wanted_by_piece: dict[int, list[int]] = {}
    for position in positions:
        k = bisect.bisect_right(starts, position) - 1
        wanted_by_piece.setdefault(k, []).append(position)
    for k in sorted(wanted_by_piece):
        piece, first = pieces[k], starts[k]
        wanted = wanted_by_piece[k]
        samples = read_shard(shards[piece.shard], [piece.start + p - first for p in wanted])
        # strict: after the last position zip asks read_shard once more, which lets it finish and close the shard.
        yield from zip(wanted, samples, strict=True)


def read_sequence(shards: Sequence[Shard], positions: Iterable[int]) -> Iterator[RawSample]:
    """The samples at the ascending `positions` of the whole `shards` laid end to end, in that order:
    how validation and predict read their sets (no shuffle)."""
    pieces = [Piece(i, 0, shard.samples) for i, shard in enumerate(shards)]
    return (sample for _, sample in read_positions(shards, pieces, positions))


def in_order(order: Sequence[int], stream: Iterator[tuple[int, RawSample]]) -> Iterator[RawSample]:
    """Re-emit the ascending `stream` in `order`, holding only what was read ahead (the shuffle buffer)."""
    held: dict[int, RawSample] = {}
    for position in order:
        while position not in held:
            got, sample = next(stream)
            held[got] = sample
        yield held.pop(position)
