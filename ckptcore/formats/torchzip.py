"""torch's zip checkpoint format (``torch.save`` since 1.6): a lazy reader and a streaming writer.

Reader: parse the zip central directory from the tail, unpickle ``<archive>/data.pkl`` with the
restricted unpickler, and hand out tensors one at a time straight from the stored records
(mmap locally, ranged reads remotely). Nothing is decompressed or copied up front.

Writer: :func:`write_state_dict` pickles the state-dict skeleton first (only shapes and dtypes are
needed), then asks for each tensor in turn and writes its record, so memory stays at one tensor.
The pickle is built exactly as ``torch.save`` builds it and records go through torch's own zip
writer, so the file is byte-for-byte what ``torch.save`` would write for the same tensors.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ckptcore.dtypes import dtype_info
from ckptcore.errors import CkptError
from ckptcore.formats.safe_pickle import StorageRef, TensorRef, load_pickle
from ckptcore.storage import ByteSource

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
    method: int  # 0 = stored


def read_zip_directory(src: ByteSource) -> dict[str, ZipRecord]:
    """The central directory of a zip file, read with two ranged reads from its tail."""
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
    cd = bytes(src.read(cd_offset, cd_size))
    records: dict[str, ZipRecord] = {}
    p = 0
    for _ in range(count):
        if cd[p : p + 4] != _CENTRAL or p + 46 > len(cd):
            raise CkptError(src.name, "corrupt zip central directory")
        (method,) = struct.unpack("<H", cd[p + 10 : p + 12])
        csize, usize = struct.unpack("<II", cd[p + 20 : p + 28])
        nlen, xlen, clen = struct.unpack("<HHH", cd[p + 28 : p + 34])
        (hoff,) = struct.unpack("<I", cd[p + 42 : p + 46])
        name = cd[p + 46 : p + 46 + nlen].decode("utf-8", "replace")
        extra = cd[p + 46 + nlen : p + 46 + nlen + xlen]
        usize, csize, hoff = _zip64_extra(extra, usize, csize, hoff)
        if name in records:
            raise CkptError(src.name, f"zip archive has two records named {name}")
        records[name] = ZipRecord(name, hoff, csize, usize, method)
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
        self._data_offsets: dict[str, int] = {}

    def _data_offset(self, rec: ZipRecord) -> int:
        off = self._data_offsets.get(rec.name) if hasattr(self, "_data_offsets") else None
        if off is not None:
            return off
        header = bytes(self.src.read(rec.header_offset, 30))
        if not header.startswith(_LOCAL):
            raise CkptError(self.name, f"corrupt zip: bad local header for {rec.name}")
        nlen, xlen = struct.unpack("<HH", header[26:30])
        off = rec.header_offset + 30 + nlen + xlen
        if off + rec.compressed_size > self.src.size:
            raise CkptError(
                self.name, f"truncated: record {rec.name} runs past the end of the file"
            )
        if hasattr(self, "_data_offsets"):
            self._data_offsets[rec.name] = off
        return off

    def _record_bytes(self, rec: ZipRecord) -> bytes | memoryview:
        if rec.method != 0:
            raise CkptError(
                self.name,
                f"record {rec.name} is compressed; torch checkpoints store records uncompressed",
            )
        return self.src.read(self._data_offset(rec), rec.size)

    def storage_record(self, storage: StorageRef) -> ZipRecord:
        name = f"{self.archive}/data/{storage.key}"
        rec = self.records.get(name)
        if rec is None:
            raise CkptError(self.name, f"missing storage record data/{storage.key}")
        if rec.method != 0:
            raise CkptError(self.name, f"storage record data/{storage.key} is compressed")
        if rec.size < storage.nbytes:
            raise CkptError(
                self.name,
                f"storage record data/{storage.key} has {rec.size} bytes, expected {storage.nbytes}",
            )
        return rec

    def byte_range(self, ref: TensorRef) -> tuple[int, int]:
        """Absolute (offset, length) in the file of the bytes ``ref`` needs."""
        rec = self.storage_record(ref.storage)
        itemsize = dtype_info(ref.dtype).itemsize
        lo, hi = ref.span()
        return self._data_offset(rec) + lo * itemsize, (hi - lo) * itemsize

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """Read one tensor: a view of the mmap for local files, one ranged read for remote ones."""
        start, length = self.byte_range(ref)
        lo, _ = ref.span()
        if ref.numel == 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        buf = self.src.read(start, length)
        if isinstance(buf, bytes):
            buf = bytearray(buf)
        flat = torch.frombuffer(buf, dtype=ref.dtype)
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

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = dtype_info(self.dtype).itemsize
        for s in self.shape:
            n *= s
        return n


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
        return (
            torch._utils._rebuild_tensor_v2,
            (
                self.storage,
                0,
                tuple(shape),
                tuple(reversed(stride)),
                False,
                collections.OrderedDict(),
            ),
        )


def _pickle_skeleton(obj: Any) -> tuple[bytes, list[_StorageSlot]]:
    slots: list[_StorageSlot] = []
    ids: dict[int, str] = {}

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            if isinstance(o, _StorageSlot):
                key = ids.get(id(o))
                if key is None:
                    key = ids[id(o)] = str(len(slots))
                    slots.append(o)
                storage_type = getattr(torch, dtype_info(o.spec.dtype).storage_class)
                return ("storage", storage_type, key, "cpu", o.numel)
            return None

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue(), slots


def write_state_dict(
    dest: str | io.IOBase,
    entries: Iterable[tuple[str, TensorSpec | None]],
    fill: Callable[[str], torch.Tensor],
    metadata: dict | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> int:
    """Write an ``OrderedDict`` state dict tensor by tensor; returns the tensor bytes written.

    ``entries`` gives every key in order with its spec (``None`` writes a ``None`` value, as NeMo
    does for ``_extra_state``). ``fill(key)`` is then called once per tensor, in order; what it
    returns must match the spec and may be freed right after. ``dest`` is a path (its file stem
    becomes the archive's record prefix, as with ``torch.save``) or a binary file object.
    """
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
    data, slots = _pickle_skeleton(sd)
    writer = torch._C.PyTorchFileWriter(dest, torch.serialization.get_crc32_options(), 64)
    writer.write_record("data.pkl", data, len(data))
    writer.write_record(".format_version", "1", 1)
    writer.write_record(".storage_alignment", "64", 2)
    writer.write_record("byteorder", "little", 6)
    total = 0
    for index, ((key, spec), _slot) in enumerate(zip(order, slots, strict=True)):
        t = fill(key)
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise CkptError(
                None, f"produced {t.dtype} {tuple(t.shape)}, planned {spec.dtype} {spec.shape}", key
            )
        if (
            not t.is_contiguous()
            or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != spec.nbytes
        ):
            t = t.contiguous().clone()
        writer.write_record(f"data/{index}", t.untyped_storage(), spec.nbytes)
        total += spec.nbytes
        if on_tensor is not None:
            on_tensor(key, spec.nbytes)
        del t
    writer.write_end_of_file()
    return total
