"""torch's zip checkpoint format (``torch.save`` since 1.6): a lazy reader and a streaming writer.

Reader: parse the zip central directory from the tail, unpickle ``<archive>/data.pkl`` with the
restricted unpickler, and hand out tensors one at a time straight from the stored records
(mmap locally, ranged reads remotely). Nothing is decompressed or copied up front.
``torch.save`` never compresses; a re-zipped file's deflated records are inflated one at a time,
on demand and strictly bounded (:mod:`ckptcore.formats.inflate`), and the file's notes say so.

Writer: :func:`write_state_dict` pickles the state-dict skeleton first (only shapes and dtypes are
needed), then asks for each tensor in turn and writes its record, so memory stays at one tensor.
The pickle is built exactly as ``torch.save`` builds it and records go through torch's own zip
writer, so the file is byte-for-byte what ``torch.save`` would write for the same tensors.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ckptcore.dtypes import DTypeName, dtype_info, dtype_name
from ckptcore.errors import CkptError
from ckptcore.formats.inflate import (
    DEFLATED,
    STORED,
    Group,
    InflatedRecord,
    inflate,
    inflate_limit,
    method_name,
)
from ckptcore.formats.safe_pickle import StorageRef, TensorRef, load_pickle
from ckptcore.formats.zipwriter import Sink, TorchZipWriter, archive_size, file_sink
from ckptcore.storage import ByteSource, Span, coalesce

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_PICKLE_BYTES = 1 << 30


@dataclass(frozen=True)
class ZipRecord:
    name: str
    header_offset: int
    compressed_size: int
    size: int
    method: int  # 0 = stored, 8 = deflate
    crc: int = 0
    flags: int = 0  # general purpose bit flags; bit 0: encrypted

    @property
    def compressed(self) -> bool:
        return self.method != STORED


def read_zip_directory(src: ByteSource) -> dict[str, ZipRecord]:
    """The central directory of a zip file, read from its tail (one ranged read when the
    directory fits in the last 64 KiB, two otherwise)."""
    if src.size < 22:
        raise CkptError(
            src.name, f"not a torch checkpoint: {src.size} bytes is too small (truncated?)"
        )
    tail_len = min(src.size, 65536 + 22)
    tail = bytes(src.read(src.size - tail_len, tail_len))
    pos = tail.rfind(_EOCD)
    if pos < 0:
        head = bytes(src.read(0, min(src.size, 16)))
        if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
            raise CkptError(src.name, "legacy (pre-1.6, non-zip) torch format is not supported")
        if head.startswith(_LOCAL):
            raise CkptError(src.name, "truncated zip archive: no central directory at the end")
        raise CkptError(src.name, "not a torch checkpoint (no zip directory found)")
    eocd = tail[pos : pos + 22]
    if len(eocd) < 22:
        raise CkptError(src.name, "truncated zip end record")
    (_, _, _, _, count, cd_size, cd_offset, _) = struct.unpack("<4sHHHHIIH", eocd)
    if count == 0xFFFF or cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        loc = tail[pos - 20 : pos] if pos >= 20 else b""
        if not loc.startswith(_EOCD64_LOCATOR):
            raise CkptError(src.name, "corrupt zip64 archive: missing locator")
        (eocd64_off,) = struct.unpack("<Q", loc[8:16])
        rec = bytes(src.read(eocd64_off, 56))
        if not rec.startswith(_EOCD64):
            raise CkptError(src.name, "corrupt zip64 end record")
        count, cd_size, cd_offset = struct.unpack("<QQQ", rec[32:56])
    if cd_offset + cd_size > src.size:
        raise CkptError(src.name, "truncated zip archive: central directory beyond end of file")
    tail_start = src.size - tail_len
    if cd_offset >= tail_start:  # the directory came with the tail (files < ~64 KiB of names)
        cd = tail[cd_offset - tail_start : cd_offset - tail_start + cd_size]
    else:
        cd = bytes(src.read(cd_offset, cd_size))
    records: dict[str, ZipRecord] = {}
    p = 0
    for _ in range(count):
        if cd[p : p + 4] != _CENTRAL or p + 46 > len(cd):
            raise CkptError(src.name, "corrupt zip central directory")
        flags, method = struct.unpack("<HH", cd[p + 8 : p + 12])
        (crc,) = struct.unpack("<I", cd[p + 16 : p + 20])
        csize, usize = struct.unpack("<II", cd[p + 20 : p + 28])
        nlen, xlen, clen = struct.unpack("<HHH", cd[p + 28 : p + 34])
        (hoff,) = struct.unpack("<I", cd[p + 42 : p + 46])
        name = cd[p + 46 : p + 46 + nlen].decode("utf-8", "replace")
        extra = cd[p + 46 + nlen : p + 46 + nlen + xlen]
        usize, csize, hoff = _zip64_extra(extra, usize, csize, hoff)
        if name in records:
            raise CkptError(src.name, f"zip archive has two records named {name}")
        records[name] = ZipRecord(name, hoff, csize, usize, method, crc, flags)
        p += 46 + nlen + xlen + clen
    return records


def _zip64_extra(extra: bytes, usize: int, csize: int, hoff: int) -> tuple[int, int, int]:
    q = 0
    while q + 4 <= len(extra):
        tag, ln = struct.unpack("<HH", extra[q : q + 4])
        body = extra[q + 4 : q + 4 + ln]
        if tag == 0x0001:
            vals = list(struct.unpack(f"<{len(body) // 8}Q", body[: len(body) // 8 * 8]))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if hoff == 0xFFFFFFFF and vals:
                hoff = vals.pop(0)
        q += 4 + ln
    return usize, csize, hoff


class TorchFile:
    """A lazily read ``torch.save`` file: the unpickled object with :class:`TensorRef` leaves."""

    def __init__(self, src: ByteSource) -> None:
        self.src = src
        self.name = src.name
        self.notes: list[str] = []
        self._data_offsets: dict[str, int] = {}
        self._inflated: dict[str, InflatedRecord] = {}
        self._group = Group()
        self.records = read_zip_directory(src)
        pkl = [n for n in self.records if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CkptError(
                self.name, "not a torch checkpoint (no single <archive>/data.pkl record)"
            )
        self.archive = pkl[0].split("/", 1)[0]
        rec = self.records[pkl[0]]
        if rec.size > MAX_PICKLE_BYTES:
            raise CkptError(self.name, f"data.pkl is {rec.size} bytes, over the limit")
        self.obj: Any = load_pickle(bytes(self._record_bytes(rec)), self.name)
        compressed = sum(r.compressed for r in self.records.values())
        if compressed:
            self.notes.append(
                f"{self.name}: {compressed} of {len(self.records)} zip records are compressed "
                "(re-zipped?); those read are inflated in memory one at a time instead of "
                "read in place (slower)"
            )

    HEADER_GAP = 16 << 10  # local headers this close are read in one request

    def locate(self, refs: list[TensorRef]) -> None:
        """Find where the records of ``refs`` start, reading their local headers all at once
        where the source is object storage (concurrent ranged GETs instead of a round trip per
        tensor when the plan asks for each span). Headers at most ``HEADER_GAP`` bytes apart
        (the small records between them: biases, norms) share one request, which costs those
        small records' bytes once more and saves most requests (~300 -> ~100 per ViT-L rank)."""
        batch = getattr(self.src, "read_ranges", None)
        if batch is None or not Span(self.src, 0, 0).remote:
            return
        recs = {}
        for ref in refs:
            rec = self.records.get(f"{self.archive}/data/{ref.storage.key}")
            if rec is not None and rec.name not in self._data_offsets:
                recs[rec.name] = rec
        if not recs:
            return
        todo = sorted(recs.values(), key=lambda r: r.header_offset)
        groups = coalesce([(r.header_offset, 30) for r in todo], self.HEADER_GAP, 4 << 20)
        blobs = batch([(start, end - start) for start, end in groups])
        g = 0
        for rec in todo:
            while groups[g][1] < rec.header_offset + 30:
                g += 1
            at = rec.header_offset - groups[g][0]
            header = bytes(memoryview(blobs[g])[at : at + 30])
            self._data_offsets[rec.name] = self._parse_local_header(rec, header)

    def _data_offset(self, rec: ZipRecord) -> int:
        off = self._data_offsets.get(rec.name)
        if off is not None:
            return off
        off = self._parse_local_header(rec, bytes(self.src.read(rec.header_offset, 30)))
        self._data_offsets[rec.name] = off
        return off

    def _parse_local_header(self, rec: ZipRecord, header: bytes) -> int:
        if not header.startswith(_LOCAL):
            raise CkptError(self.name, f"corrupt zip: bad local header for {rec.name}")
        nlen, xlen = struct.unpack("<HH", header[26:30])
        off = rec.header_offset + 30 + nlen + xlen
        if off + rec.compressed_size > self.src.size:
            raise CkptError(
                self.name, f"truncated: record {rec.name} runs past the end of the file"
            )
        return off

    def _check_method(self, rec: ZipRecord) -> None:
        """Stored and deflated records can be read; anything else is refused by name."""
        if rec.flags & 1:
            raise CkptError(self.name, f"record {rec.name} is encrypted")
        if rec.method not in (STORED, DEFLATED):
            raise CkptError(
                self.name,
                f"record {rec.name} is compressed with {method_name(rec.method)} "
                f"(zip method {rec.method}); only stored and deflate records can be read",
            )
        if rec.method == DEFLATED and rec.size > inflate_limit(rec.compressed_size):
            raise CkptError(
                self.name,
                f"record {rec.name} expands beyond {inflate_limit(rec.compressed_size)} bytes "
                "(a zip bomb?)",
            )

    def _record_bytes(self, rec: ZipRecord) -> bytes | memoryview | bytearray:
        self._check_method(rec)
        if rec.method == DEFLATED:
            off = self._data_offset(rec)
            return inflate(
                self.src, off, rec.compressed_size, rec.size, rec.crc, self.name, rec.name
            )
        return self.src.read(self._data_offset(rec), rec.size)

    def storage_record(self, storage: StorageRef) -> ZipRecord:
        name = f"{self.archive}/data/{storage.key}"
        rec = self.records.get(name)
        if rec is None:
            raise CkptError(self.name, f"missing storage record data/{storage.key}")
        self._check_method(rec)
        if rec.compressed and rec.size != storage.nbytes:
            raise CkptError(
                self.name,
                f"compressed storage record data/{storage.key} declares {rec.size} bytes "
                f"uncompressed, expected {storage.nbytes}",
            )
        if rec.size < storage.nbytes:
            raise CkptError(
                self.name,
                f"storage record data/{storage.key} has {rec.size} bytes, expected {storage.nbytes}",
            )
        return rec

    def record_source(self, rec: ZipRecord) -> tuple[ByteSource, int]:
        """Where a storage record's bytes are: (source, offset of its first byte in it).

        A stored record is a range of the file itself; a deflated one is its own source of
        uncompressed bytes, inflated when first read (one per record, made once).
        """
        if not rec.compressed:
            return self.src, self._data_offset(rec)
        src = self._inflated.get(rec.name)
        if src is None:
            made = InflatedRecord(
                self.src,
                self._data_offset(rec),
                rec.compressed_size,
                rec.size,
                rec.crc,
                self.name,
                rec.name,
                self._group,
            )
            src = self._inflated.setdefault(rec.name, made)  # one per record, threads or not
        return src, 0

    def byte_range(self, ref: TensorRef) -> tuple[ByteSource, int, int]:
        """The source holding the bytes ``ref`` needs, and their (offset, length) in it."""
        rec = self.storage_record(ref.storage)
        src, base = self.record_source(rec)
        itemsize = dtype_info(ref.dtype).itemsize
        lo, hi = ref.span()
        return src, base + lo * itemsize, (hi - lo) * itemsize

    def span(self, ref: TensorRef) -> Span:
        """Where a contiguous tensor's bytes are, without reading them."""
        if not ref.is_contiguous():
            raise ValueError("span() needs a contiguous tensor")
        src, start, length = self.byte_range(ref)
        rec = self.storage_record(ref.storage)
        whole = ref.offset == 0 and length == rec.size
        return Span(src, start, length, rec.crc if whole and rec.crc else None)

    def tensor(self, ref: TensorRef) -> Any:
        """Read one tensor: a view of the mmap for local files, one ranged read for remote ones,
        a view of the inflated record for deflated ones."""
        import torch

        src, start, length = self.byte_range(ref)
        lo, _ = ref.span()
        if ref.numel == 0:
            return torch.empty(ref.shape, dtype=ref.dtype.torch)
        buf = src.read(start, length)
        if isinstance(buf, bytes):
            buf = bytearray(buf)
        flat = torch.frombuffer(buf, dtype=ref.dtype.torch)
        return flat.as_strided(ref.shape, ref.stride, ref.offset - lo)


def state_dict_of(obj: Any, path: str) -> collections.OrderedDict:
    """The model state dict inside an unpickled checkpoint (a Lightning ``.ckpt`` or a plain one)."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
    elif isinstance(obj, dict):
        sd = obj
    else:
        raise CkptError(path, f"expected a state dict, found {type(obj).__name__}")
    for key, value in sd.items():
        if not isinstance(key, str):
            raise CkptError(path, f"state dict key {key!r} is not a string")
        if value is not None and not isinstance(value, TensorRef):
            raise CkptError(path, f"unexpected {type(value).__name__} value in the state dict", key)
    return sd


# ---------------------------------------------------------------------------------------------
# Writer


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor to be written will look like; its bytes come later."""

    dtype: DTypeName
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))  # torch dtypes welcome
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def nbytes(self) -> int:
        n = dtype_info(self.dtype).itemsize
        for s in self.shape:
            n *= s
        return n


class _Global:
    """A module-level name to pickle (``GLOBAL module name``) without importing it."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle only checks that a reducer is callable
        raise TypeError(f"{self.module}.{self.name} is a pickling marker")


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_TYPES: dict[str, _Global] = {}


class _StorageSlot:
    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.numel = spec.nbytes // dtype_info(spec.dtype).itemsize


class _TensorSlot:
    """Pickles exactly like a contiguous CPU tensor of ``spec`` whose storage is its own."""

    def __init__(self, spec: TensorSpec) -> None:
        self.storage = _StorageSlot(spec)
        self.spec = spec

    def __reduce_ex__(self, protocol: int) -> tuple:
        shape = self.spec.shape
        stride, acc = [], 1
        for s in reversed(shape):
            stride.append(acc)
            acc *= s
        hooks: collections.OrderedDict = collections.OrderedDict()
        return (
            _REBUILD_TENSOR,
            (self.storage, 0, tuple(shape), tuple(reversed(stride)), False, hooks),
        )


class _SkeletonPickler(pickle._Pickler):  # type: ignore[name-defined]
    """The pure-Python pickler (same bytes as the C one at protocol 2), taught to write
    :class:`_Global` names and torch's storage persistent ids."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def __init__(self, buf: io.BytesIO) -> None:
        super().__init__(buf, protocol=2)
        self.slots: list[_StorageSlot] = []
        self._keys: dict[int, str] = {}

    def save_marker(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = save_marker

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageSlot):
            key = self._keys.get(id(obj))
            if key is None:
                key = self._keys[id(obj)] = str(len(self.slots))
                self.slots.append(obj)
            cls = dtype_info(obj.spec.dtype).storage_class
            storage_type = _STORAGE_TYPES.setdefault(cls, _Global("torch", cls))
            return ("storage", storage_type, key, "cpu", obj.numel)
        return None


def pickle_skeleton(
    entries: Iterable[tuple[str, TensorSpec | None]], metadata: dict | None = None
) -> tuple[bytes, list[tuple[str, TensorSpec]]]:
    """``data.pkl`` of an OrderedDict state dict, and its tensors in storage order."""
    sd: collections.OrderedDict = collections.OrderedDict()
    order: list[tuple[str, TensorSpec]] = []
    for key, spec in entries:
        if spec is None:
            sd[key] = None
        else:
            sd[key] = _TensorSlot(spec)
            order.append((key, spec))
    if metadata is not None:
        sd._metadata = metadata  # type: ignore[attr-defined]
    buf = io.BytesIO()
    pickler = _SkeletonPickler(buf)
    pickler.dump(sd)
    if len(pickler.slots) != len(order):
        raise AssertionError("every tensor has its own storage")
    return buf.getvalue(), order


_HEADER_RECORDS = (
    (".format_version", b"1"),
    (".storage_alignment", b"64"),
    ("byteorder", b"little"),
)


class StateDictLayout:
    """Everything about a rank file that is known before its tensors are read: its size too."""

    def __init__(
        self, archive_name: str, entries: list[tuple[str, TensorSpec | None]], metadata: dict | None
    ) -> None:
        self.archive_name = archive_name
        self.pkl, self.tensors = pickle_skeleton(entries, metadata)
        records = [("data.pkl", len(self.pkl))] + [(n, len(d)) for n, d in _HEADER_RECORDS]
        records += [(f"data/{i}", spec.nbytes) for i, (_, spec) in enumerate(self.tensors)]
        self.size = archive_size(archive_name, records, len(self.tensors))

    def write(
        self,
        sink: Sink,
        fill: Callable[[str], Any],
        on_tensor: Callable[[str, int], None] | None = None,
    ) -> int:
        """Stream the file into ``sink``. ``fill(key)`` gives a contiguous tensor, or a
        ``(chunks, crc[, check])`` tuple: buffers or file ranges whose bytes are the tensor, its
        CRC-32 (an int, a callable returning it, or None to compute it here), and a function
        run over every byte written (a NaN scan)."""
        w = TorchZipWriter(sink, self.archive_name, len(self.tensors))
        w.write_bytes("data.pkl", self.pkl)
        for name, data in _HEADER_RECORDS:
            w.write_bytes(name, data)
        for index, (key, spec) in enumerate(self.tensors):
            produced = fill(key)
            check = None
            if isinstance(produced, tuple):
                chunks, crc, *rest = produced
                check = rest[0] if rest else None
            else:
                chunks, crc = [tensor_bytes(produced, spec, key)], None
            w.write_record(f"data/{index}", spec.nbytes, chunks, crc, check)
            if on_tensor is not None:
                on_tensor(key, spec.nbytes)
        w.finish()
        if w.pos != self.size:
            raise AssertionError(f"wrote {w.pos} bytes, laid out {self.size}")
        return w.pos


def tensor_bytes(t: Any, spec: TensorSpec, key: str) -> memoryview:
    """The raw bytes of a tensor that must match ``spec``."""
    import torch

    if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
        raise CkptError(
            None, f"produced {t.dtype} {tuple(t.shape)}, planned {spec.dtype} {spec.shape}", key
        )
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_state_dict(
    dest: str | io.IOBase,
    entries: Iterable[tuple[str, TensorSpec | None]],
    fill: Callable[[str], Any],
    metadata: dict | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> int:
    """Write an ``OrderedDict`` state dict tensor by tensor; returns the file's size.

    ``entries`` gives every key in order with its spec (``None`` writes a ``None`` value, as NeMo
    does for ``_extra_state``). ``fill(key)`` is then called once per tensor, in order (see
    :meth:`StateDictLayout.write`). ``dest`` is a path (its file stem becomes the archive's
    record prefix, as with ``torch.save``) or a binary file object (prefix ``archive``).
    """
    if isinstance(dest, str):
        name = os.path.splitext(os.path.basename(dest))[0]
        layout = StateDictLayout(name, list(entries), metadata)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            return layout.write(file_sink(fd), fill, on_tensor)
        finally:
            os.close(fd)
    layout = StateDictLayout("archive", list(entries), metadata)
    return layout.write(dest.write, fill, on_tensor)
