"""Deflate-compressed zip records: inflated on demand, strictly bounded, one at a time.

``torch.save`` stores every record uncompressed, and ckptcore reads them in place. A checkpoint
re-zipped by hand (``zip -r``, Python's ``ZIP_DEFLATED``) has deflated records instead: such a
record is read whole (its compressed bytes only, by ranged reads) and inflated into memory the
first time it is read. What the zip directory declares is checked before anything is read (the
tensor storage's size exactly, at most ``max(1 GiB, 50 x`` the compressed size``)``); inflating
never produces more than that, must produce exactly that, and must match the record's CRC-32. Each thread keeps only the record of each file it read last, so
memory stays near one record per source file and worker, however many records the files hold.
"""

from __future__ import annotations

import threading
import weakref
import zlib
from collections.abc import Callable

from ckptcore.errors import CkptError
from ckptcore.storage import ByteSource, Span

STORED, DEFLATED = 0, 8
METHOD_NAMES = {
    1: "shrink",
    6: "implode",
    8: "deflate",
    9: "deflate64",
    12: "bzip2",
    14: "lzma",
    19: "lz77",
    93: "zstd",
    95: "xz",
    96: "jpeg",
    97: "wavpack",
    98: "ppmd",
    99: "aes-encrypted",
}
MAX_INFLATE_RATIO = 50  # a record may not expand more than this...
MAX_INFLATE_FLOOR = 1 << 30  # ...beyond this many bytes
CHUNK = 8 << 20  # compressed bytes read per step, and inflated bytes produced per step


def method_name(method: int) -> str:
    return METHOD_NAMES.get(method, "an unknown method")


def inflate_limit(compressed_size: int) -> int:
    """The most bytes a deflated record of ``compressed_size`` bytes may declare."""
    return max(MAX_INFLATE_FLOOR, compressed_size * MAX_INFLATE_RATIO)


def inflate(
    src: ByteSource, start: int, csize: int, size: int, crc: int, path: str, record: str
) -> bytearray:
    """The ``size`` bytes a raw deflate stream of ``csize`` bytes at ``start`` of ``src`` holds.

    Never produces more than ``size`` bytes (plus one, to tell that there is more), reads the
    compressed bytes in bounded steps, and refuses a stream that is corrupt, truncated, followed
    by other bytes, inflates to another size, or fails its CRC-32 check.
    """
    try:
        out = bytearray(size)
    except MemoryError:
        raise CkptError(
            path, f"not enough memory to inflate record {record} ({size} bytes)"
        ) from None
    view = memoryview(out)
    d = zlib.decompressobj(-15)
    chunk = memoryview(bytearray(min(CHUNK, csize)))
    filled = pos = 0
    running = 0
    try:
        while pos < csize and not d.eof:
            n = min(CHUNK, csize - pos)
            src.readinto(start + pos, chunk[:n])
            pos += n
            data: bytes | memoryview = chunk[:n]
            while not d.eof:
                want = min(CHUNK, size - filled + 1)  # one byte more than declared: a bomb
                piece = d.decompress(data, want)
                if filled + len(piece) > size:
                    raise CkptError(
                        path,
                        f"record {record} inflates to more than the {size} bytes "
                        "its zip directory declares (a zip bomb?)",
                    )
                view[filled : filled + len(piece)] = piece
                running = zlib.crc32(piece, running)
                filled += len(piece)
                tail = d.unconsumed_tail
                if not piece and tail and len(tail) >= len(data):  # no progress (never seen)
                    raise CkptError(path, f"record {record} holds a corrupt deflate stream")
                if not tail and len(piece) < want:  # input used up, no output pending
                    break
                data = tail
    except zlib.error as exc:
        raise CkptError(path, f"record {record} holds a corrupt deflate stream ({exc})") from None
    if not d.eof:
        raise CkptError(
            path,
            f"record {record} holds a truncated deflate stream ({filled} of {size} bytes inflated)",
        )
    if d.unused_data or pos < csize:
        extra = len(d.unused_data) + csize - pos
        raise CkptError(
            path, f"record {record} has {extra} stray bytes after the end of its deflate stream"
        )
    if filled != size:
        raise CkptError(
            path,
            f"record {record} inflates to {filled} bytes, its zip directory declares {size}",
        )
    if running != crc:
        raise CkptError(
            path,
            f"record {record} fails its CRC-32 check (0x{running:08x}, "
            f"the zip directory says 0x{crc:08x})",
        )
    return out


class _Held:
    """One inflated record, alive while a thread's slot or a reader's view holds it."""

    __slots__ = ("data", "__weakref__")

    def __init__(self, data: bytearray) -> None:
        self.data = data


class Group:
    """The records of one zip file: a thread keeps one inflated record per group."""


_local = threading.local()


def _slots() -> weakref.WeakKeyDictionary[Group, _Held]:
    """This thread's kept records, by file (gone with the file)."""
    slots = getattr(_local, "slots", None)
    if slots is None:
        slots = _local.slots = weakref.WeakKeyDictionary()
    return slots


def _nothing() -> _Held | None:
    return None


class InflatedRecord:
    """A :class:`~ckptcore.storage.ByteSource` of a deflated record's uncompressed bytes.

    Nothing is read until the first read; the record is then inflated whole (see
    :func:`inflate`) and kept while this thread reads it, so a tensor read in blocks is inflated
    once. The thread reading another record of the same file (``group``) drops it; threads
    reading the same record share one copy. It is never a local file range (so no in-kernel
    copies), and it announces reads (``plan_reads``) only where the zip itself is in object
    storage: the compressed range is what gets fetched ahead.
    """

    def __init__(
        self,
        parent: ByteSource,
        start: int,
        csize: int,
        size: int,
        crc: int,
        path: str,
        record: str,
        group: Group | None = None,
    ) -> None:
        self.parent = parent
        self.group = group if group is not None else Group()
        self.start = start
        self.csize = csize
        self.size = size
        self.crc = crc
        self.name = path
        self.record = record
        self._held: Callable[[], _Held | None] = _nothing
        self._lock = threading.Lock()
        if Span(parent, start, csize).remote:
            self.plan_reads = self._plan_reads

    def _plan_reads(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch the compressed bytes ahead, once, unless the record is inflated already."""
        if ranges and self.csize and self._held() is None:
            self.parent.plan_reads([(self.start, self.csize)])  # type: ignore[attr-defined]

    def _data(self) -> bytearray:
        slots = _slots()
        held = self._held()
        if held is None:
            with self._lock:  # one thread inflates; others wanting it wait and share
                held = self._held()
                if held is None:
                    slots.pop(self.group, None)  # first drop this thread's last one of the file
                    held = _Held(
                        inflate(
                            self.parent,
                            self.start,
                            self.csize,
                            self.size,
                            self.crc,
                            self.name,
                            self.record,
                        )
                    )
                    self._held = weakref.ref(held)
        slots[self.group] = held
        return held.data

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CkptError(
                self.name,
                f"truncated: needs bytes {offset}..{offset + length} of record {self.record}, "
                f"which holds {self.size}",
            )

    def read(self, offset: int, length: int) -> memoryview:
        self._check(offset, length)
        if length == 0:
            return memoryview(b"")
        return memoryview(self._data())[offset : offset + length]

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        if len(buf):
            buf[:] = memoryview(self._data())[offset : offset + len(buf)]

    def close(self) -> None:
        held = self._held()
        self._held = _nothing
        slots = _slots()
        if held is not None and slots.get(self.group) is held:
            del slots[self.group]
