"""Byte sources and URLs: local files (mmapped), fsspec objects (ranged reads), tar members.

Every path in ckptcore is a URL or a local path. Readers never load a whole file: they ask a
:class:`ByteSource` for byte ranges, which a local file answers from an mmap (zero-copy,
file-backed pages) and object storage answers with ranged GETs.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import hashlib
import json
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import fsspec
from fsspec.core import url_to_fs

from ckptcore import settings
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
    except ImportError as exc:
        hint = " (pip install 'ckpt-pipeline[s3]')" if url.startswith(("s3://", "s3a://")) else ""
        raise CkptError(url, f"unsupported storage URL: {exc}{hint}") from None
    except ValueError as exc:
        raise CkptError(url, f"unsupported storage URL: {exc}") from None


def forget_listings(url: str) -> None:
    """Drop what this process's filesystem cached about ``url`` and everything under it (fsspec
    keeps listings per process, and answers ``info`` from them), so the next listing or
    ``info`` asks the store: another writer's changes are seen."""
    fs, _ = get_fs(url)
    # fsspec's public call drops one path and its parents, not what lies under it: all of it
    fs.invalidate_cache()


def etag_of(info: dict) -> str | None:
    """The ETag in an fsspec ``info()`` record, without its quotes (None where there is none)."""
    return str(info.get("ETag") or info.get("etag") or "").strip('"') or None


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
        if self._mm is None:
            raise CkptError(self.name, "read after the file was closed")
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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()  # the mapping holds a descriptor of its own
            except BufferError:
                pass  # views of it live on in tensors handed out: unmapped when the last goes


def coalesce(
    ranges: list[tuple[int, int]],
    gap: int,
    part: int,
    keep_apart: Callable[[int, int], bool] | None = None,
) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges, in reading order, as ``[start, end)`` requests: a range
    that starts at most ``gap`` bytes after the previous one ends joins its request while the
    request stays within ``part`` bytes (and ``keep_apart(end, start)`` of the gap is false);
    a range longer than ``part`` is cut into parts."""
    out: list[tuple[int, int]] = []
    for off, length in ranges:
        end = off + length
        if (
            out
            and 0 <= off - out[-1][1] <= gap
            and end - out[-1][0] <= part
            and not (keep_apart is not None and off > out[-1][1] and keep_apart(out[-1][1], off))
        ):
            out[-1] = (out[-1][0], end)
            continue
        for p in range(off, end, part):
            out.append((p, min(p + part, end)))
    return out


def read_concurrency() -> int:
    """Ranged GETs in flight per remote object while reading ahead (``ckptcore.settings``:
    ``CKPT_READ_CONCURRENCY``, the CLI's ``--read-concurrency``)."""
    return settings.current().read_concurrency


class KeptRanges:
    """Ranges fetched by :meth:`RemoteFile.read_ranges` (a zip's local headers, with the small
    records between them), kept in memory when there is no range cache: later reads of them
    are answered here instead of fetching them again."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._pieces: list[bytes] = []
        self._lock = threading.Lock()

    def _find(self, offset: int, length: int) -> int | None:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and offset + length <= self._starts[i] + len(self._pieces[i]):
            return i
        return None

    def covers(self, offset: int, length: int) -> bool:
        with self._lock:
            return self._find(offset, length) is not None

    def overlaps(self, start: int, end: int) -> bool:
        with self._lock:
            i = bisect.bisect_left(self._starts, end) - 1
            return i >= 0 and self._starts[i] + len(self._pieces[i]) > start

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            i = self._find(offset, length)
            if i is None:
                raise KeyError((offset, length))
            lo = offset - self._starts[i]
            return self._pieces[i][lo : lo + length]

    def put_many(self, pieces: list[tuple[int, bytes | memoryview]]) -> None:
        with self._lock:
            for offset, data in pieces:
                if self._find(offset, len(data)) is not None:
                    continue
                i = bisect.bisect_right(self._starts, offset)
                self._starts.insert(i, offset)
                self._pieces.insert(i, bytes(data))


class RemoteFile:
    """An object in fsspec storage, read by byte ranges; counts the bytes it fetched.

    ``plan_reads`` announces the ranges a job will read, in order: they are then fetched ahead,
    a few at a time and within a memory bound, so downloads overlap with the writing that
    consumes them; each range is dropped once read to its end. Other reads go straight through.
    """

    PREFETCH_BYTES = 256 << 20  # in flight or waiting to be consumed
    PART = 64 << 20  # larger ranges are fetched in parts of this size
    GAP = 64 << 10  # announced ranges this close are fetched in one request

    def __init__(self, url: str, size: int | None = None, cache: RangeCache | None = None) -> None:
        self.name = url
        self._fs, self._path = get_fs(url)
        etag = None
        if size is None or cache is not None:
            try:
                info = self._fs.info(self._path)
            except FileNotFoundError:
                raise CkptError(url, "file not found") from None
            size = int(info.get("size") or 0) if size is None else size
            etag = etag_of(info)
        self.size = size
        self.bytes_read = 0  # fetched from storage
        self.requests = 0
        self.cached_bytes = 0  # answered by the range cache
        self._cached = cache.entry(url, size, etag) if cache is not None else None
        self._kept = KeptRanges() if self._cached is None else None
        self._lock = threading.Lock()
        self._planned: collections.deque[tuple[int, int]] = collections.deque()
        self._ahead: dict[tuple[int, int], Future] = {}
        self._ahead_bytes = 0
        self._pool: ThreadPoolExecutor | None = None

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        _check_range(self.name, offset, length, self.size)
        held = self._holder(offset, length)
        if held is not None:
            data = held.read(offset, length)
            with self._lock:
                self.cached_bytes += length
            return data
        cached = self._cached
        data = self._fs.cat_file(self._path, start=offset, end=offset + length)
        with self._lock:
            self.bytes_read += len(data)
            self.requests += 1
        if len(data) != length:
            raise CkptError(self.name, f"short read at {offset}: {len(data)} of {length} bytes")
        if cached is not None:
            cached.put(offset, data)
        return data

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several small ranges at once: concurrent ranged GETs, not one round trip each."""
        out: list[bytes | None] = [None] * len(ranges)
        missing = []
        for i, (offset, length) in enumerate(ranges):
            _check_range(self.name, offset, length, self.size)
            held = self._holder(offset, length)
            if held is not None:
                out[i] = held.read(offset, length)
                with self._lock:
                    self.cached_bytes += length
            else:
                missing.append(i)
        if missing:
            got = self._fs.cat_ranges(
                [self._path] * len(missing),
                [ranges[i][0] for i in missing],
                [ranges[i][0] + ranges[i][1] for i in missing],
            )
            for i, data in zip(missing, got, strict=True):
                if isinstance(data, BaseException):
                    raise data
                if len(data) != ranges[i][1]:
                    raise CkptError(
                        self.name, f"short read at {ranges[i][0]}: {len(data)} of {ranges[i][1]}"
                    )
                out[i] = data
            with self._lock:
                self.bytes_read += sum(ranges[i][1] for i in missing)
                self.requests += len(missing)
            store = self._cached if self._cached is not None else self._kept
            store.put_many([(ranges[i][0], out[i]) for i in missing])  # type: ignore[union-attr, misc]
        return out  # type: ignore[return-value]

    def _holds_any(self, start: int, end: int) -> bool:
        """Is any byte of ``[start, end)`` held locally?"""
        return any(
            store is not None and store.overlaps(start, end) for store in (self._cached, self._kept)
        )

    def _holder(self, offset: int, length: int) -> CachedObject | KeptRanges | None:
        """Where ``[offset, offset + length)`` is already held locally, if anywhere."""
        for store in (self._cached, self._kept):
            if store is not None and store.covers(offset, length):
                return store
        return None

    # -- read-ahead -------------------------------------------------------------------------

    def plan_reads(self, ranges: list[tuple[int, int]]) -> None:
        """Announce ``(offset, length)`` ranges about to be read in this order.

        Ranges that follow each other in the file (apart from gaps of at most ``GAP`` bytes,
        such as the zip headers between two records) are fetched together in requests of up
        to ``PART`` bytes: a few large GETs instead of one per tensor. Each request ends where
        a range ends, so reading in order consumes it to its end and releases it. Ranges held
        locally already (range cache, or kept from :meth:`read_ranges`) are not fetched.
        """
        todo = [(off, n) for off, n in ranges if self._holder(off, n) is None]
        with self._lock:  # no request bridges a gap holding bytes held here: none twice
            for start, end in coalesce(todo, self.GAP, self.PART, self._holds_any):
                self._planned.append((start, end - start))
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
                        read_concurrency(), thread_name_prefix="ckpt-get"
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
        if self._cached is not None:
            self._cached.close()


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

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes | memoryview]:
        for off, n in ranges:
            _check_range(self.name, off, n, self.size)
        batch = getattr(self.parent, "read_ranges", None)
        shifted = [(self.base + off, n) for off, n in ranges]
        if batch is not None:
            return batch(shifted)
        return [self.parent.read(off, n) for off, n in shifted]

    def plan_reads(self, ranges: list[tuple[int, int]]) -> None:
        planner = getattr(self.parent, "plan_reads", None)
        if planner is not None:
            planner([(self.base + off, n) for off, n in ranges])

    def close(self) -> None:
        pass


class CachedObject:
    """The ranges of one remote object kept in a local sparse file of the object's size.

    ``covers`` says whether a range was stored whole; the list of stored ranges is saved beside
    the data after each write (data first), so a later process finds what an earlier one read.
    """

    def __init__(
        self, data_path: str, size: int, release: Callable[[CachedObject], bool] | None = None
    ) -> None:
        self.path = data_path
        self._release = release
        self._index = data_path + ".ranges.json"
        self._lock = threading.Lock()
        self._ranges: list[tuple[int, int]] = []  # sorted, disjoint [start, end)
        try:
            with open(self._index, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("size") == size:
                self._ranges = [(int(a), int(b)) for a, b in saved["ranges"]]
        except (OSError, ValueError, KeyError, TypeError):
            self._ranges = []
        self._fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._busy = 0  # threads using the descriptor (see _using_fd)
        self._closed = False
        if os.fstat(self._fd).st_size != size:
            os.ftruncate(self._fd, size)  # sparse: only stored ranges take disk space
            self._ranges = []
        self._size = size

    def covers(self, offset: int, length: int) -> bool:
        with self._lock:
            return any(a <= offset and offset + length <= b for a, b in self._ranges)

    def overlaps(self, start: int, end: int) -> bool:
        with self._lock:
            return any(a < end and start < b for a, b in self._ranges)

    def read(self, offset: int, length: int) -> bytes:
        with self._using_fd() as fd:
            if fd is None:
                raise CkptError(self.path, "range cache entry read after it was closed")
            data = os.pread(fd, length, offset)
            while len(data) < length:  # pread may return short on large reads
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    raise CkptError(self.path, f"range cache truncated at {offset + len(data)}")
                data += more
        return data

    def put(self, offset: int, data: bytes | memoryview) -> None:
        self.put_many([(offset, data)])

    def put_many(self, pieces: list[tuple[int, bytes | memoryview]]) -> None:
        """Store ranges, then record them (one index write for all). After :meth:`close` (a
        read-ahead finishing late), nothing is stored: the cache only ever saves a fetch."""
        with self._using_fd() as fd:
            if fd is None:
                return
            for offset, data in pieces:
                view = memoryview(data)
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
            with self._lock:
                for offset, data in pieces:
                    merged: list[tuple[int, int]] = []
                    start, end = offset, offset + len(data)
                    for a, b in self._ranges:
                        if b < start or a > end:
                            merged.append((a, b))
                        else:
                            start, end = min(a, start), max(b, end)
                    merged.append((start, end))
                    self._ranges = sorted(merged)
                tmp = f"{self._index}.{threading.get_ident()}.tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump({"size": self._size, "ranges": self._ranges}, f)
                os.replace(tmp, self._index)

    def stored_bytes(self) -> int:
        with self._lock:
            return sum(b - a for a, b in self._ranges)

    @contextlib.contextmanager
    def _using_fd(self) -> Iterator[int | None]:
        """The file descriptor, kept open while in use (None once closed): a close racing a
        read-ahead's write must not free the number for another file to be opened under."""
        with self._lock:
            if self._closed:
                fd = None
            else:
                self._busy += 1
                fd = self._fd
        try:
            yield fd
        finally:
            if fd is not None:
                with self._lock:
                    self._busy -= 1
                    self._close_if_idle()

    def _close_if_idle(self) -> None:  # under self._lock
        if self._closed and self._busy == 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        if self._release is not None and not self._release(self):
            return  # another reader still uses it
        with self._lock:
            self._closed = True
            self._close_if_idle()


class RangeCache:
    """A local folder that keeps the byte ranges read from remote objects.

    A conversion that reads a checkpoint in place from object storage fetches only the records
    it needs; with a cache, those ranges also land on local disk, so the next reader of the same
    object (the verify step, a rerun) reads them locally instead of fetching them again. Each
    object has one sparse file named by its URL, size and ETag: a changed object is a new entry.
    """

    def __init__(self, folder: str) -> None:
        self.folder = local_path(folder)

    _open: dict[str, CachedObject] = {}  # one per cache file in this process, shared
    _users: dict[str, int] = {}
    _lock = threading.Lock()

    def entry(self, url: str, size: int, etag: str | None) -> CachedObject:
        """The cache file of one object version; readers in this process share it (threads
        converting different rank files of one checkpoint add to one list of ranges)."""
        os.makedirs(self.folder, exist_ok=True)
        key = hashlib.sha256(f"{url}\t{size}\t{etag or ''}".encode()).hexdigest()[:32]
        path = os.path.join(self.folder, key)
        with RangeCache._lock:
            cached = RangeCache._open.get(path)
            if cached is None:
                cached = RangeCache._open[path] = CachedObject(path, size, self._release)
            RangeCache._users[path] = RangeCache._users.get(path, 0) + 1
            return cached

    @staticmethod
    def _release(cached: CachedObject) -> bool:
        """One reader is done with ``cached``; True when it was the last (close the file)."""
        with RangeCache._lock:
            left = RangeCache._users.get(cached.path, 1) - 1
            if left > 0:
                RangeCache._users[cached.path] = left
                return False
            RangeCache._users.pop(cached.path, None)
            RangeCache._open.pop(cached.path, None)
            return True


def open_source(url: str, cache: RangeCache | None = None) -> ByteSource:
    """Open a URL or path for ranged reads; remote reads go through ``cache`` when given."""
    if is_local(url):
        return LocalFile(local_path(url))
    return RemoteFile(url, cache=cache)
