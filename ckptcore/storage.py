"""Byte sources and URLs: local files (mmapped), fsspec objects (ranged reads), tar members.

Every path in ckptcore is a URL or a local path. Readers never load a whole file: they ask a
:class:`ByteSource` for byte ranges, which a local file answers from an mmap (zero-copy,
file-backed pages) and object storage answers with ranged GETs.
"""

from __future__ import annotations

import collections
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import fsspec
from fsspec.core import url_to_fs

from ckptcore.errors import CkptError


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path inside it for a URL or local path."""
    if is_local(url):
        return fsspec.filesystem("file"), os.path.abspath(local_path(url))
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise CkptError(url, f"unsupported storage URL: {exc}") from None


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


class ByteSource(Protocol):
    """Random access to the bytes of one file (or one member inside a file)."""

    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes | memoryview: ...

    def readinto(self, offset: int, buf: memoryview) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Span:
    """``length`` bytes at ``offset`` of a source: data not read yet."""

    src: ByteSource
    offset: int
    length: int
    crc: int | None = None  # the zip record's CRC-32, when the span is a whole record

    @property
    def remote(self) -> bool:
        """In object storage (not a local file, nor a member of a local archive)."""
        return self.local() is None and hasattr(self.src, "plan_reads")

    def readinto(self, buf: memoryview, start: int = 0) -> None:
        """Fill ``buf`` with the span's bytes from ``start`` on."""
        self.src.readinto(self.offset + start, buf)

    def local(self) -> tuple[LocalFile, int] | None:
        """The local file and absolute offset holding this span, if it is on local disk."""
        src, offset = self.src, self.offset
        while isinstance(src, SubRange):
            src, offset = src.parent, src.base + offset
        return (src, offset) if isinstance(src, LocalFile) else None


def _check_range(name: str, offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise CkptError(name, f"truncated: needs bytes {offset}..{offset + length}, has {size}")


class LocalFile:
    """A local file, mmapped copy-on-write: reads are zero-copy views of page-cache pages."""

    def __init__(self, path: str, display: str | None = None) -> None:
        self.name = display or path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CkptError(self.name, "file not found") from None
        except IsADirectoryError:
            raise CkptError(self.name, "is a directory, expected a file") from None
        except PermissionError:
            raise CkptError(self.name, "permission denied") from None
        self.size = os.fstat(self._fd).st_size
        self._mm = (
            mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY) if self.size > 0 else None
        )

    @property
    def fd(self) -> int:
        return self._fd

    def read(self, offset: int, length: int) -> memoryview:
        if length == 0:
            return memoryview(b"")
        _check_range(self.name, offset, length, self.size)
        return memoryview(self._mm)[offset : offset + length]

    def readinto(self, offset: int, buf: memoryview) -> None:
        """pread into ``buf``: one copy from the page cache, no page faults in our mappings."""
        _check_range(self.name, offset, len(buf), self.size)
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise CkptError(self.name, f"file shrank while reading at {offset + done}")
            done += n

    def close(self) -> None:
        # mmap views may still be alive in tensors handed out; let GC unmap.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RemoteFile:
    """An object in fsspec storage, read by byte ranges; counts the bytes it fetched.

    ``plan_reads`` announces the ranges a job will read, in order: they are then fetched ahead,
    a few at a time and within a memory bound, so downloads overlap with the writing that
    consumes them; each range is dropped once read to its end. Other reads go straight through.
    """

    PREFETCH_BYTES = 256 << 20  # in flight or waiting to be consumed
    PREFETCH_REQUESTS = 4  # parallel ranged GETs
    PART = 64 << 20  # larger ranges are fetched in parts of this size

    def __init__(self, url: str, size: int | None = None) -> None:
        self.name = url
        self._fs, self._path = get_fs(url)
        if size is None:
            try:
                size = int(self._fs.size(self._path))
            except FileNotFoundError:
                raise CkptError(url, "file not found") from None
        self.size = size
        self.bytes_read = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._planned: collections.deque[tuple[int, int]] = collections.deque()
        self._ahead: dict[tuple[int, int], Future] = {}
        self._ahead_bytes = 0
        self._pool: ThreadPoolExecutor | None = None

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        _check_range(self.name, offset, length, self.size)
        data = self._fs.cat_file(self._path, start=offset, end=offset + length)
        with self._lock:
            self.bytes_read += len(data)
            self.requests += 1
        if len(data) != length:
            raise CkptError(self.name, f"short read at {offset}: {len(data)} of {length} bytes")
        return data

    # -- read-ahead -------------------------------------------------------------------------

    def plan_reads(self, ranges: list[tuple[int, int]]) -> None:
        """Announce ``(offset, length)`` ranges about to be read in this order."""
        with self._lock:
            for off, length in ranges:
                for p in range(0, length, self.PART):
                    self._planned.append((off + p, min(self.PART, length - p)))
        self._fill()

    def _fill(self) -> None:
        with self._lock:
            while self._planned and (
                not self._ahead or self._ahead_bytes + self._planned[0][1] <= self.PREFETCH_BYTES
            ):
                rng = self._planned.popleft()
                if rng in self._ahead:
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.PREFETCH_REQUESTS, thread_name_prefix="ckpt-get"
                    )
                self._ahead[rng] = self._pool.submit(self.read, *rng)
                self._ahead_bytes += rng[1]

    def _take(self, offset: int, length: int) -> tuple[tuple[int, int], Future] | None:
        with self._lock:
            for rng, fut in self._ahead.items():
                if rng[0] <= offset and offset + length <= rng[0] + rng[1]:
                    return rng, fut
        return None

    def readinto(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            hit = self._take(offset + done, 1)
            if hit is None:
                buf[done:] = self.read(offset + done, len(buf) - done)
                return
            (start, length), fut = hit
            n = min(len(buf) - done, start + length - (offset + done))
            data = fut.result()
            lo = offset + done - start
            buf[done : done + n] = memoryview(data)[lo : lo + n]
            done += n
            if lo + n == length:  # consumed to its end: release it, fetch more
                with self._lock:
                    if self._ahead.pop((start, length), None) is not None:
                        self._ahead_bytes -= length
                self._fill()

    def close(self) -> None:
        with self._lock:
            self._planned.clear()
            self._ahead.clear()
            self._ahead_bytes = 0
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class SubRange:
    """A window of another source (a member inside an uncompressed tar)."""

    def __init__(self, parent: ByteSource, offset: int, size: int, name: str) -> None:
        self.parent = parent
        self.base = offset
        self.size = size
        self.name = name

    def read(self, offset: int, length: int) -> bytes | memoryview:
        _check_range(self.name, offset, length, self.size)
        return self.parent.read(self.base + offset, length)

    def readinto(self, offset: int, buf: memoryview) -> None:
        _check_range(self.name, offset, len(buf), self.size)
        self.parent.readinto(self.base + offset, buf)

    def plan_reads(self, ranges: list[tuple[int, int]]) -> None:
        planner = getattr(self.parent, "plan_reads", None)
        if planner is not None:
            planner([(self.base + off, n) for off, n in ranges])

    def close(self) -> None:
        pass


def open_source(url: str) -> ByteSource:
    """Open a URL or path for ranged reads."""
    if is_local(url):
        return LocalFile(local_path(url))
    return RemoteFile(url)
