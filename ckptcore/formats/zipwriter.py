"""A sequential writer of torch's zip container, byte-identical to ``torch.save``'s output.

``torch.save`` writes through miniz with data descriptors (sizes and CRC after the data), every
record's data aligned to 64 bytes by a ``FB`` padding extra field, zip64 records always present,
and a final ``.data/serialization_id`` derived from the record names and CRCs. Because sizes come
after the data, the archive can be produced strictly front to back: into a tar member, a pipe or
an object-storage multipart upload, with no seeking. The total size is known before any data is
written (:func:`archive_size`), so a tar header can precede it.

Layout facts (checked against torch 2.13's writer, see tests/core/test_zipwriter.py):
local header: version 0, flags 0x0808, method 0, time/date/CRC/sizes 0; zip64 extra
``[size, 0]`` when size >= 2**32-1 and ``[offset]`` when the offset is; data descriptor with
8-byte sizes when the local header had a zip64 extra; central entries carry the real values or
0xFFFFFFFF plus a zip64 extra; then zip64 end record, locator and end record.
"""

from __future__ import annotations

import os
import struct
import weakref
import zlib
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

ALIGN = 64
U32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_NAME_HASHES: list[str] | None = None
_PARALLEL_MIN = 1 << 20
_POOL = None


def _crc_pool():
    """One shared helper thread: zlib.crc32 and os.write both release the GIL."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-crc")
    return _POOL


# CRC-32 arithmetic (zlib's polynomial, reflected): combining the CRCs of two byte strings into
# the CRC of their concatenation without reading them, as zlib's crc32_combine does (Python's
# zlib module has no binding for it). multmodp multiplies two polynomials modulo the CRC
# polynomial; _X2N[k] is x^(2^k) modulo it. One combine costs about log2(len) multiplications.
_CRC_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^1
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib's algorithm)."""
    p = 1 << 31  # x^0
    n, k = len2, 3  # x^(8 * len2): bytes to bits
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def crc32_concat(parts: Iterable[tuple[int, int]]) -> int:
    """The CRC-32 of the concatenation of byte strings given as ``(crc32, length)`` pairs."""
    crc = 0  # the CRC-32 of no bytes
    for part_crc, length in parts:
        crc = crc32_combine(crc, part_crc, length)
    return crc


_FAST_CRC32: Callable[[Any, int], int] | None | bool = None  # None: not looked up yet


def fast_crc32() -> Callable[[Any, int], int] | None:
    """ISA-L's ``crc32(data, crc)`` from the ``isal`` package (a declared dependency with wheels
    for the common platforms): the same CRC-32 as zlib's, about 6x faster here (carry-less
    multiplication), and it releases the GIL like zlib. Checked against zlib once before use;
    None where the package is missing or disagrees (zlib is used then)."""
    global _FAST_CRC32
    if _FAST_CRC32 is None:
        _FAST_CRC32 = False
        try:
            from isal.isal_zlib import crc32 as isal_crc32

            probe = bytes(range(256)) * 41 + b"ckpt"
            if all(
                isal_crc32(probe[:n], seed) == zlib.crc32(probe[:n], seed)
                for seed in (0, 0x1234ABCD)
                for n in (0, 1, 7, 64, 1000, len(probe))
            ):
                _FAST_CRC32 = isal_crc32
        except ImportError:
            pass
    return _FAST_CRC32 or None


def use_fast_crc(enabled: bool) -> None:
    """Use the packaged CRC-32 where present (the default), or zlib's always (to compare)."""
    global _FAST_CRC32
    _FAST_CRC32 = None if enabled else False


def crc32_array(arr, running: int = 0) -> int:
    """``zlib.crc32`` of a C-contiguous numpy array's bytes, through :func:`fast_crc32` for
    large arrays (both release the GIL)."""
    fn = fast_crc32() if arr.nbytes >= 1 << 16 else None
    if fn is None:
        return zlib.crc32(arr, running)
    return fn(arr, running)


def crc32_bytes(data: bytes | memoryview, running: int = 0) -> int:
    """``zlib.crc32`` of a bytes-like object, through :func:`fast_crc32` when large (no copy)."""
    fn = fast_crc32() if len(data) >= 1 << 16 else None
    if fn is None:
        return zlib.crc32(data, running)
    return fn(data, running)


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit values."""
    return (seed ^ (value + 0x9E3779B9 + ((seed << 6) & _MASK64) + (seed >> 2))) & _MASK64


def _record_name_hash(num_storages: int) -> str:
    """The first half of torch's serialization id: it depends only on the record names.

    torch combines ``std::hash`` of every record name in ``unordered_set`` order; for a state dict
    the names are fixed given the number of storages, so the values are tabulated (computed with
    torch's own writer); beyond the table they are computed the same way on demand
    (:mod:`ckptcore.formats.torch_writer`).
    """
    global _NAME_HASHES
    if _NAME_HASHES is None:
        text = (
            resources.files("ckptcore.formats").joinpath("torch_record_name_hashes.txt").read_text()
        )
        _NAME_HASHES = text.split()
    if num_storages < len(_NAME_HASHES):
        return _NAME_HASHES[num_storages]
    from ckptcore.formats.torch_writer import record_name_hash

    return record_name_hash(state_dict_record_names(num_storages), ALIGN)


def state_dict_record_names(num_storages: int) -> list[str]:
    """The records ``torch.save`` writes for a state dict before its end of file."""
    return ["data.pkl", ".format_version", ".storage_alignment", "byteorder"] + [
        f"data/{i}" for i in range(num_storages)
    ]


class FileRange:
    """Bytes of a local file: copied by the kernel when the sink is a file, else read."""

    __slots__ = ("fd", "offset", "length", "_view")

    def __init__(self, fd: int, offset: int, length: int, view: Callable[[], memoryview]) -> None:
        self.fd, self.offset, self.length, self._view = fd, offset, length, view

    def __len__(self) -> int:
        return self.length

    def view(self) -> memoryview:
        return self._view()


def _scan(data, running: int | None, check: Callable[[memoryview], None] | None) -> int | None:
    """CRC-32 (when ``running`` is given) and ``check`` over a buffer, off the writing thread."""
    if check is not None:
        check(data)
    return None if running is None else zlib.crc32(data, running)


class _Entry:
    __slots__ = ("name", "offset", "size", "crc")

    def __init__(self, name: bytes, offset: int, size: int, crc: int) -> None:
        self.name, self.offset, self.size, self.crc = name, offset, size, crc


Sink = Callable[[bytes | memoryview], object]


class TorchZipWriter:
    """Write records front to back to ``sink`` (a callable taking bytes), as torch.save would.

    With ``sink=None`` nothing is written and only positions advance: the dry run that
    :func:`archive_size` uses. Record data comes as an iterable of buffers; ``crc`` may be given
    when the caller already computed it (or computes it elsewhere) -- else it is computed here.
    """

    def __init__(self, sink: Sink | None, archive_name: str, num_storages: int) -> None:
        self._pool = _crc_pool() if sink is not None else None
        self.sink = sink
        self.prefix = archive_name + "/"
        self.pos = 0
        self.entries: list[_Entry] = []
        self.crc_hash = 0
        self.name_hash = _record_name_hash(num_storages)

    def _emit(self, data: bytes | memoryview) -> None:
        if self.sink is not None and len(data):
            self.sink(data)
        self.pos += len(data)

    def _local_header(self, name: bytes, size: int) -> tuple[bytes, bool]:
        fields: list[int] = []
        if size >= U32:
            fields += [size, 0]
        if self.pos >= U32:
            fields.append(self.pos)
        zip64 = (
            b"" if not fields else struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields)
        )
        start = self.pos + 30 + len(name) + 4 + len(zip64)
        pad = (-start) % ALIGN
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = 0x0808 if size else 0x0800  # miniz writes no data descriptor for empty records
        header = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra)
        )
        return header + name + extra, bool(fields)

    def begin_record(self, name: str) -> tuple[bytes, int]:
        return (self.prefix + name).encode("utf-8"), self.pos

    def write_record(
        self,
        name: str,
        size: int,
        chunks: Iterable[bytes | memoryview | int | FileRange] = (),
        crc: int | Callable[[], int] | None = None,
        check: Callable[[memoryview], None] | None = None,
    ) -> None:
        """One record of ``size`` bytes from ``chunks``; ``crc`` a value or a callable giving it.

        Chunks are buffers, or :class:`FileRange` s that a file sink copies in the kernel while
        the CRC (and ``check``, e.g. a NaN scan) runs on the other core over the same bytes.
        """
        full, offset = self.begin_record(name)
        header, wide = self._local_header(full, size)
        self._emit(header)
        written = 0
        running = 0
        copier = getattr(self.sink, "copy_range", None)
        # Bytes are read besides being written only for a CRC not given or a check: a record whose
        # CRC is known and that is made of file ranges is copied by the kernel without a read.
        scan = crc is None or check is not None
        for chunk in chunks:
            if isinstance(chunk, int):  # a hole: the sink seeks (sparse files; tests)
                if self.sink is not None:
                    self.sink(chunk)
                self.pos += chunk
                written += chunk
                continue
            if isinstance(chunk, FileRange):
                if copier is None:
                    chunk = chunk.view()
                else:
                    pending = (
                        self._pool.submit(
                            _scan, chunk.view(), running if crc is None else None, check
                        )
                        if scan
                        else None
                    )
                    copier(chunk.fd, chunk.offset, chunk.length)
                    self.pos += chunk.length
                    written += chunk.length
                    if pending is not None:
                        result = pending.result()
                        if crc is None:
                            running = result
                    continue
            if not scan:
                self._emit(chunk)
            elif self._pool is not None and len(chunk) >= _PARALLEL_MIN:
                # CRC (and check) on the other core while this one writes the same bytes
                pending = self._pool.submit(_scan, chunk, running if crc is None else None, check)
                self._emit(chunk)
                result = pending.result()
                if crc is None:
                    running = result
            else:
                if check is not None:
                    check(chunk)
                self._emit(chunk)
                if crc is None:
                    running = zlib.crc32(chunk, running)
            written += len(chunk)
        if self.sink is None:
            self.pos += size - written
        elif written != size:
            raise ValueError(f"record {name}: wrote {written} bytes, declared {size}")
        if size == 0:
            self.entries.append(_Entry(full, offset, 0, 0))
            return
        value = running if crc is None else (crc() if callable(crc) else crc)
        if wide:
            self._emit(struct.pack("<IIQQ", 0x08074B50, value, size, size))
        else:
            self._emit(struct.pack("<IIII", 0x08074B50, value, size, size))
        self.crc_hash = _hash_combine(self.crc_hash, value)
        self.entries.append(_Entry(full, offset, size, value))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write_record(name, len(data), [data], zlib.crc32(data))

    def finish(self) -> None:
        """``version``, ``.data/serialization_id``, central directory and end records."""
        self.write_bytes("version", b"3\n")
        sid = f"{self.name_hash}{self.crc_hash:020d}".encode()
        self.write_bytes(".data/serialization_id", sid)
        cd_start = self.pos
        for e in self.entries:
            extra_fields: list[int] = []
            csize = usize = e.size
            offset = e.offset
            if e.size >= U32:
                extra_fields += [e.size, e.size]
                csize = usize = U32
            if e.offset >= U32:
                extra_fields.append(e.offset)
                offset = U32
            extra = (
                b""
                if not extra_fields
                else struct.pack(
                    f"<HH{len(extra_fields)}Q", 1, 8 * len(extra_fields), *extra_fields
                )
            )
            flags = 0x0808 if e.size else 0x0800
            self._emit(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    0,
                    0,
                    flags,
                    0,
                    0,
                    0,
                    e.crc,
                    csize,
                    usize,
                    len(e.name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    offset,
                )  # fmt: skip
                + e.name
                + extra
            )
        cd_size = self.pos - cd_start
        n = len(self.entries)
        eocd64 = self.pos
        self._emit(
            struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_start)
        )
        self._emit(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
        count = min(n, 0xFFFF)
        self._emit(
            struct.pack(
                "<IHHHHIIH",
                0x06054B50,
                0,
                0,
                count,
                count,
                min(cd_size, U32),
                min(cd_start, U32),
                0,
            )
        )


def archive_size(archive_name: str, records: list[tuple[str, int]], num_storages: int) -> int:
    """Exact size of the archive holding ``records`` (name, size) in order, before ``finish``."""
    w = TorchZipWriter(None, archive_name, num_storages)
    for name, size in records:
        w.write_record(name, size, (), 0)
    w.finish()
    return w.pos


WRITE_BEHIND = 32 << 20  # a file sink starts the disk writes of every this many bytes written
_LIBC: dict[str, Callable[..., int] | None] | None = None
_FLUSH_POOL = None


def _libc() -> dict[str, Callable[..., int] | None]:
    """``sync_file_range`` and ``fallocate`` (Linux; None elsewhere). Python binds neither,
    hence ctypes (whose calls release the GIL)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = {"sync_file_range": None, "fallocate": None}
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            for name in _LIBC:
                fn = getattr(libc, name)
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                if name == "fallocate":
                    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                fn.restype = ctypes.c_int
                _LIBC[name] = fn
        except (ImportError, OSError, AttributeError):
            pass
    return _LIBC


def _flush_pool():
    """One shared thread issuing write-behind requests, in order, off the writing thread."""
    global _FLUSH_POOL
    if _FLUSH_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _FLUSH_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-flush")
    return _FLUSH_POOL


def _close_after_flushes(fd: int) -> None:
    try:
        _flush_pool().submit(os.close, fd)  # after the requests queued before it
    except RuntimeError:  # the interpreter is exiting: the pool is gone
        os.close(fd)


class FileSink:
    """A sink writing to a file descriptor; ``copy_range`` copies file bytes in the kernel.

    ``reserve(n)`` allocates the disk blocks of the next ``n`` bytes up front (``fallocate``,
    keeping the file's size): the filesystem then neither reserves nor allocates blocks page by
    page while the bytes are written and written back, which costs the writing thread more
    than the copy itself on ext4.

    With ``write_behind`` (a file that will be fsynced), every :data:`WRITE_BEHIND` bytes the
    range just written is handed to the disk (``sync_file_range(SYNC_FILE_RANGE_WRITE)`` on a
    helper thread, through a duplicate of the descriptor): the disk writes overlap with producing
    the rest, and the final ``fsync`` only waits for the tail. Without it, the kernel would
    start them after 30 s or once dirty pages exceed 10% of memory, and the ``fsync`` would
    write the whole file.
    """

    def __init__(
        self,
        fd: int,
        write_behind: bool = False,
        on_advance: Callable[[int], None] | None = None,
    ) -> None:
        self.fd = fd
        self._on_advance = on_advance
        self._kernel_copy = hasattr(os, "copy_file_range")
        libc = _libc()
        self._flush = libc["sync_file_range"] if write_behind else None
        self._fallocate = libc["fallocate"]
        self._flush_fd = -1
        try:
            self._pos = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:  # a pipe: no positions to flush or reserve
            self._pos = None
            self._flush = self._fallocate = None
        self._flushed = self._pos
        if self._flush is not None:
            self._flush_fd = os.dup(fd)  # valid however long the requests wait
            weakref.finalize(self, _close_after_flushes, self._flush_fd)

    def reserve(self, nbytes: int) -> None:
        if self._fallocate is not None and nbytes > 0:
            self._fallocate(self.fd, 1, self._pos, nbytes)  # FALLOC_FL_KEEP_SIZE; a hint only

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._flush is not None and self._pos - self._flushed >= WRITE_BEHIND:
            _flush_pool().submit(
                self._flush, self._flush_fd, self._flushed, self._pos - self._flushed, 2
            )
            self._flushed = self._pos
        if self._on_advance is not None:
            self._on_advance(self._pos)

    def _write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while len(view):
            view = view[os.write(self.fd, view) :]
        return n

    def __call__(self, data: bytes | memoryview) -> None:
        n = self._write(data)
        if self._pos is not None:
            self._advance(n)

    def copy_range(self, src_fd: int, offset: int, length: int) -> None:
        done = 0
        while done < length:
            n = 0
            if self._kernel_copy:
                try:
                    n = os.copy_file_range(src_fd, self.fd, length - done, offset + done)
                except OSError:
                    self._kernel_copy = False  # another filesystem or kernel: copy by hand
            if n <= 0:
                chunk = os.pread(src_fd, min(length - done, 8 << 20), offset + done)
                if not chunk:
                    raise OSError(f"source shrank while copying at {offset + done}")
                n = self._write(chunk)
            done += n
        if self._pos is not None:
            self._advance(length)


def file_sink(
    fd: int, write_behind: bool = True, on_advance: Callable[[int], None] | None = None
) -> FileSink:
    """A sink writing to a file descriptor, handling short writes; see :class:`FileSink`.

    ``on_advance(position)``: called after each write with the file's new end (for a reader
    following the file, e.g. :class:`ckptcore.multipart.FollowingUpload`)."""
    return FileSink(fd, write_behind, on_advance)
