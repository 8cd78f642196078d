"""Byte sources and URLs: local files (mmapped), fsspec objects (ranged reads), tar members.

Every path in ckptcore is a URL or a local path. Readers never load a whole file: they ask a
:class:`ByteSource` for byte ranges, which a local file answers from an mmap (zero-copy,
file-backed pages) and object storage answers with ranged GETs.
"""

from __future__ import annotations

import mmap
import os
import threading
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

    def readinto(self, buf: memoryview, start: int = 0) -> None:
        """Fill ``buf`` with the span's bytes from ``start`` on."""
        self.src.readinto(self.offset + start, buf)


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
    """An object in fsspec storage, read by byte ranges; counts the bytes it fetched."""

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
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        if offset < 0 or offset + length > self.size:
            raise CkptError(
                self.name, f"truncated: needs bytes {offset}..{offset + length}, has {self.size}"
            )
        data = self._fs.cat_file(self._path, start=offset, end=offset + length)
        with self._lock:
            self.bytes_read += len(data)
        if len(data) != length:
            raise CkptError(self.name, f"short read at {offset}: {len(data)} of {length} bytes")
        return data

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.read(offset, len(buf))

    def close(self) -> None:
        pass


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

    def close(self) -> None:
        pass


def open_source(url: str) -> ByteSource:
    """Open a URL or path for ranged reads."""
    if is_local(url):
        return LocalFile(local_path(url))
    return RemoteFile(url)
