"""Read a reader's planned samples from tar shards as raw bytes, skipping the others unread.

webdataset's tar iterator does the member-level work; its `select_files` hook is where samples
that are not wanted (another reader's, or consumed before a resume) are passed over without
their data being read, let alone decoded. Once the last wanted sample of a piece is complete the
shard is closed, so a reader that needs the start of a shard never streams the rest of it.
"""

from __future__ import annotations

import bisect
import tarfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from webdataset.tariterators import tar_file_iterator

from salnet.data.plan import Piece, piece_starts
from salnet.data.sources import DataError, Shard, open_shard
from salnet.shards.format import split_member_name


@dataclass
class RawSample:
    shard: str  # the shard's name, for messages
    index: int  # the sample's number within its shard
    key: str
    members: dict[str, bytes]  # extension after the key (salnet.shards.format: "jpg", "mask.png", ...) -> bytes

    def where(self) -> str:
        return f"shard {self.shard}, sample '{self.key}' (#{self.index})"


class _PastLastWanted(Exception):
    """Raised from the select hook to end the tar iteration early (nothing is wrong)."""


class _MemberSelector:
    """The `select_files` hook: numbers samples as their keys change and passes members of wanted ones.

    A member's key is its name up to the first dot, as the shard format (and webdataset) splits it.
    """

    def __init__(self, wanted: Sequence[int]):
        self.wanted, self.next_wanted = wanted, 0
        self.index, self.key = -1, None

    def __call__(self, name: str) -> bool:
        key, _ = split_member_name(name)
        if key != self.key:
            self.key, self.index = key, self.index + 1
            while self.next_wanted < len(self.wanted) and self.wanted[self.next_wanted] < self.index:
                self.next_wanted += 1
            if self.next_wanted == len(self.wanted):
                raise _PastLastWanted()
        return self.wanted[self.next_wanted] == self.index


def _stop_quietly(exn: Exception) -> bool:
    # webdataset's error handler protocol: False ends the iteration, raising propagates.
    if isinstance(exn, _PastLastWanted):
        return False
    raise exn


def read_shard(shard: Shard, wanted: Sequence[int]) -> Iterator[RawSample]:
    """The samples numbered `wanted` (ascending) of `shard`, in that order; a shard that ends early stops the run."""
    selector = _MemberSelector(wanted)
    stream = open_shard(shard)
    sample, got, hang_up_quietly = None, 0, False
    try:
        for member in tar_file_iterator(stream, handler=_stop_quietly, select_files=selector):
            key, ext = split_member_name(member["fname"])
            if sample is None or sample.index != selector.index:
                if sample is not None:
                    yield sample
                    got += 1
                sample = RawSample(shard.name, selector.index, key, {})
            sample.members[ext] = member["data"]
        if sample is not None:
            yield sample
            got += 1
        hang_up_quietly = got == len(wanted)
    except GeneratorExit:
        hang_up_quietly = True  # the consumer stopped early (an epoch cut short); nothing is wrong with the shard
        raise
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {shard.name} is unreadable after {selector.index + 1} samples: {e}") from None
    finally:
        _close(stream, shard, quiet=hang_up_quietly)
    if got < len(wanted):
        raise DataError(f"shard {shard.name} ended after {selector.index + 1} samples, but the plan needs sample "
                        f"#{wanted[got]} (its manifest says {shard.samples}): the shard is truncated or was replaced; "
                        "run `python -m salnet.shards verify`")


def _close(stream, shard: Shard, quiet: bool) -> None:
    # A curl or pipe: process exits non-zero when the reader hangs up early on purpose; that only
    # matters if the samples did not all arrive.
    try:
        stream.close()
    except OSError as e:
        if not quiet:
            raise DataError(f"shard {shard.name}: the reading process failed: {e}") from None


def read_positions(shards: Sequence[Shard], pieces: Sequence[Piece], positions: Iterable[int]) -> Iterator[tuple[int, RawSample]]:
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


def in_order(order: Sequence[int], stream: Iterator[tuple[int, RawSample]]) -> Iterator[RawSample]:
    """Re-emit the ascending `stream` in `order`, holding only what was read ahead (the shuffle buffer)."""
    held: dict[int, RawSample] = {}
    for position in order:
        while position not in held:
            got, sample = next(stream)
            held[got] = sample
        yield held.pop(position)
