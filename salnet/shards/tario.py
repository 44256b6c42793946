"""Read a shard's tar members without trusting the shard: plain tar only, no member above a size limit.

Shards are plain (uncompressed) tar. A compressed file (gzip, bzip2, xz, zstd, lz4) is refused
from its first bytes, before any decompression, because a few megabytes of gzip can hold a 2 GiB
member. Every member's size is checked when its header is parsed, before its data is read
(pax and GNU long-name headers too, whose data tarfile itself would read into memory); a member
above `max_member_bytes` is refused. Used by the loader's reader (salnet.data.reader) and by
`verify`; pack refuses to write such members in the first place.

    tar = ShardTar(fileobj, max_member_bytes)
    for info in tar:            # TarInfo of each member, in archive order
        data = tar.read(info)   # only the members wanted; the others are skipped unread
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
# First bytes of a compressed stream -> its name. tar itself has no magic at offset 0.
COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
}
_HEAD = max(len(magic) for magic in COMPRESSED_MAGIC)


class TarRefused(ValueError):
    """The shard is compressed, or a member is larger than the limit; nothing of it was decompressed or read."""


def compression(head: bytes) -> str | None:
    """The compression whose magic number `head` starts with, or None (plain tar, or not an archive at all)."""
    return next((name for magic, name in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def compressed_refusal(kind: str) -> str:
    return (
        f"it is {kind}-compressed; shards are plain, uncompressed tar (as `python -m salnet.shards pack` writes "
        "them), so that no member is larger in memory than on disk: decompress it (e.g. `gunzip`) or repack"
    )


def member_refusal(name: str, size: int, limit: int) -> str:
    return (
        f"member '{name}' is {size} bytes ({size / 2**20:.1f} MiB), above the limit of {limit} bytes "
        f"({limit / 2**20:.0f} MiB) for one member; it was not read. If the data is genuine, raise the limit "
        "(verify --max-member-bytes, data.max_member_bytes)"
    )


class ShardTar:
    """Members of the tar in `fileobj` (any object with read(n): a file, a curl or pipe: stdout), read forward once."""

    def __init__(self, fileobj, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        head = fileobj.read(_HEAD)
        kind = compression(head)
        if kind is not None:
            raise TarRefused(compressed_refusal(kind))
        self._tar = tarfile.open(
            fileobj=_Prefixed(head, fileobj), mode="r|", tarinfo=_bounded_tarinfo(max_member_bytes)
        )

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        for info in self._tar:
            yield info
            self._tar.members = []  # stream mode keeps every TarInfo otherwise

    def read(self, info: tarfile.TarInfo) -> bytes:
        """The data of `info`, the member just yielded (its size is within the limit)."""
        return self._tar.extractfile(info).read()

    @property
    def offset(self) -> int:
        """Where the next header would start: after the last member read, or at a header tarfile stopped at."""
        return self._tar.offset

    def close(self) -> None:
        self._tar.close()  # the caller's fileobj stays open


def _bounded_tarinfo(limit: int) -> type[tarfile.TarInfo]:
    class BoundedTarInfo(tarfile.TarInfo):
        # _proc_member runs right after the 512-byte header is parsed and before anything it
        # announces is read: a member's data, and a pax or GNU long-name header's payload, which
        # tarfile reads into memory itself. (A private hook, unchanged in CPython since 2.x.)
        def _proc_member(self, tar):
            if self.size > limit:
                raise TarRefused(member_refusal(self.name, self.size, limit))
            return super()._proc_member(tar)

    return BoundedTarInfo


class _Prefixed:
    """`head` (already read to look for a compression magic) followed by the rest of `fileobj`."""

    def __init__(self, head: bytes, fileobj):
        self.head, self.fileobj = head, fileobj

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.fileobj.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.fileobj.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + (self.fileobj.read(size - len(data)) if size > len(data) else b"")
