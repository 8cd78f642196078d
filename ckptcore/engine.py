"""The streaming engine: execute a plan one target file, one tensor at a time.

Each target tensor is made from its source pieces. Where the bytes allow it, no tensor is built at
all: a copied or dim-0-concatenated tensor is a list of byte ranges of the (mmapped) sources,
written straight to the output; a split along another dim is gathered into one reusable buffer.
Only casts and unusual sources go through torch. Anonymous memory therefore stays near the
largest tensor, and every output byte is written once, straight into its final place.

Writing a rank file from local sources uses both cores (:class:`_Producer`): a helper thread runs
ahead through the tensors, gathering split rows block by block and computing CRC-32s and the
NaN/Inf scan, while the writing thread copies file ranges in the kernel and writes the blocks.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ckptcore.dtypes import BY_NAME, dtype_name
from ckptcore.errors import CkptError
from ckptcore.formats.torchzip import StateDictLayout
from ckptcore.formats.zipwriter import FileRange, Sink, crc32_array, crc32_concat, file_sink
from ckptcore.plan import FilePlan, Piece, Plan, TargetTensor
from ckptcore.sources import Checkpoint
from ckptcore.storage import Span

Progress = Callable[[str, int], None]

# NaN/Inf test per dtype on the raw bits: (unsigned view, exponent mask, all bits but the sign).
# A value is NaN or Inf when its exponent bits are all set: (bits & no_sign) >= exponent mask.
_NONFINITE = {
    "float32": (np.uint32, 0x7F800000, 0x7FFFFFFF),
    "float16": (np.uint16, 0x7C00, 0x7FFF),
    "bfloat16": (np.uint16, 0x7F80, 0x7FFF),
    "float64": (np.uint64, 0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF),
}
_NUMPY_FLOAT = {"float32": np.float32, "float64": np.float64}
BLOCK = 4 << 20  # bytes moved per step: source -> buffer (checks, CRC) -> sink, cache-sized


def _has_nonfinite(buf, dtype: Any, tmp: np.ndarray | None = None) -> bool:
    """NaN/Inf anywhere in ``buf`` (raw bytes of ``dtype``); ``tmp``: optional scratch bytes."""
    dtype = dtype_name(dtype)
    if len(buf) == 0 or dtype not in _NONFINITE:
        return False
    if dtype in _NUMPY_FLOAT:
        # min and max propagate NaN and reach +-Inf: two vectorised passes, nothing allocated
        arr = np.frombuffer(buf, dtype=_NUMPY_FLOAT[dtype])
        return not (np.isfinite(arr.min()) and np.isfinite(arr.max()))
    view_type, mask, no_sign = _NONFINITE[dtype]  # numpy's float16 reductions are slow
    arr = np.frombuffer(buf, dtype=view_type)
    out = None
    if tmp is not None and tmp.nbytes >= arr.nbytes:
        out = np.frombuffer(tmp, dtype=view_type, count=arr.size)
    return bool(np.bitwise_and(arr, view_type(no_sign), out=out).max() >= mask)


def _read_piece(ck: Checkpoint, pc: Piece, dim: int | None) -> Any:
    t = ck.ranks[(pc.tp_rank, pc.pp_rank)].tensor(pc.key)
    if pc.start is not None and dim is not None:
        t = t.narrow(dim, pc.start, pc.length)
    return t


def tensor_bits(t: Any) -> Any:
    """A tensor's bytes as a flat uint8 view: equal bits, not equal values (NaNs, signed zeros)."""
    return t.contiguous().reshape(-1).view(dtype_name("uint8").torch)


def _replica_error(ck: Checkpoint, tt: TargetTensor, rp: Piece) -> CkptError:
    first = tt.pieces[0]
    return CkptError(
        ck.url,
        f"replicated tensor differs between ranks (tp={first.tp_rank}, pp={first.pp_rank}) "
        f"and (tp={rp.tp_rank}, pp={rp.pp_rank})",
        tt.key,
    )


def _nonfinite_error(ck: Checkpoint, tt: TargetTensor) -> CkptError:
    return CkptError(
        ck.url, "holds NaN or Inf values (pass --allow-nonfinite to keep them)", tt.key
    )


class Scratch:
    """Reusable, pre-faulted buffers per worker: blocks in flight and gathered tensors.

    Fresh allocations cost page faults on every tensor (the dominant CPU cost when resharding);
    reusing buffers sized to the largest tensor keeps anonymous memory flat and copies fast.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def take(self, nbytes: int, slot: str = "out") -> np.ndarray:
        buf = self._bufs.get(slot)
        if buf is None or buf.size < nbytes:
            self._bufs.pop(slot, None)  # free the old one first
            buf = self._bufs[slot] = np.zeros(
                max(nbytes, 1), dtype=np.uint8
            )  # zeros: fault in once
        return buf[:nbytes]

    def view(self, dtype: Any, shape: tuple[int, ...], nbytes: int) -> Any:
        import torch

        return torch.from_numpy(self.take(nbytes)).view(dtype_name(dtype).torch).view(shape)


Chunk = Span | memoryview


def _piece_geometry(
    shape: tuple[int, ...], d: int, pc: Piece, itemsize: int
) -> tuple[int, int, int, int]:
    """A piece of a contiguous source tensor split along ``d``, in bytes: (rows before ``d``,
    bytes per row, first byte of the piece in a row, bytes of the piece per row)."""
    outer = 1
    for s in shape[:d]:
        outer *= s
    inner = itemsize
    for s in shape[d + 1 :]:
        inner *= s
    start = 0 if pc.start is None else pc.start
    length = shape[d] if pc.length is None else pc.length
    return outer, shape[d] * inner, start * inner, length * inner


def _subspan(span: Span, lo: int, n: int) -> Span:
    """``n`` bytes from ``lo`` of ``span``; a whole span keeps its record's CRC."""
    if lo == 0 and n == span.length:
        return span
    return Span(span.src, span.offset + lo, n)


def known_crc(chunks: list[Chunk]) -> int | None:
    """The CRC-32 of the chunks' bytes when every chunk is a whole zip record with a stored CRC.

    The source's stored CRCs are trusted, not re-verified: copied records then need no read at
    all (``copy_file_range``). torch.load never checks record CRCs (mmap or not), and a record
    corrupted in the source keeps a CRC that does not match it in the output too, where zip tools
    still see it, instead of a fresh CRC vouching for the corrupted bytes.
    """
    if not all(isinstance(c, Span) and c.crc is not None for c in chunks):
        return None
    return crc32_concat((c.crc, c.length) for c in chunks)  # type: ignore[union-attr]


def _compare_by_crc(a: Span, b: Span) -> bool:
    """Replicas in object storage are compared by their zip records' CRC-32: no bytes fetched."""
    return (a.remote or b.remote) and a.crc is not None and b.crc is not None


def _read_span(span: Span, scratch: Scratch | None, slot: str) -> memoryview:
    buf = memoryview(
        scratch.take(span.length, slot) if scratch is not None else np.empty(span.length, np.uint8)
    )
    span.readinto(buf)
    return buf


def _piece_spans(
    ck: Checkpoint, tt: TargetTensor
) -> list[tuple[Span, tuple[int, ...], Piece]] | None:
    """Each piece of ``tt`` as (where its stored bytes are, its shape, the piece); None where a
    piece has no stored bytes of the target's dtype (missing, cast, or a view)."""
    assert tt.spec is not None
    out = []
    for pc in tt.pieces:
        sr = ck.ranks[(pc.tp_rank, pc.pp_rank)]
        value = sr.state[pc.key]
        if value is None or value.dtype != tt.spec.dtype:
            return None
        span = sr.span(pc.key)
        if span is None:
            return None
        out.append((span, tuple(value.shape), pc))
    return out


def tensor_chunks(
    ck: Checkpoint, tt: TargetTensor, scratch: Scratch | None = None
) -> list[Chunk] | None:
    """The target tensor's bytes as source spans (or one gathered buffer), without building a
    tensor; None where that is not possible (casts, views, sources without stored bytes)."""
    assert tt.spec is not None
    spans = _piece_spans(ck, tt)
    if spans is None:
        return None
    first_bytes = None
    for rp in tt.replicas:
        other = ck.ranks[(rp.tp_rank, rp.pp_rank)].span(rp.key)
        if other is None:
            return None
        first = spans[0][0]
        if other.length != first.length:
            raise _replica_error(ck, tt, rp)
        if _compare_by_crc(first, other):
            if first.crc != other.crc:
                raise _replica_error(ck, tt, rp)
            continue
        if first_bytes is None:
            first_bytes = bytes(_read_span(first, scratch, "b"))
        if bytes(_read_span(other, scratch, "a")) != first_bytes:
            raise _replica_error(ck, tt, rp)
    d = tt.dim
    if d is None:
        return [spans[0][0]]
    itemsize = BY_NAME[tt.dtype].itemsize
    geometry = []
    for span, shape, pc in spans:
        geometry.append((span, *_piece_geometry(shape, d, pc, itemsize)))
    if all(outer == 1 for _, outer, _, _, _ in geometry):  # dim-0 pieces: contiguous byte ranges
        return [_subspan(span, lo, n) for span, _, _, lo, n in geometry]
    outer = geometry[0][1]
    width = sum(n for *_, n in geometry)
    out = (
        scratch.take(outer * width) if scratch is not None else np.empty(outer * width, np.uint8)
    ).reshape(outer, width)
    col = 0
    for span, _, row, lo, n in geometry:
        src = np.frombuffer(_read_span(span, scratch, "in"), dtype=np.uint8).reshape(outer, row)
        out[:, col : col + n] = src[:, lo : lo + n]
        col += n
    return [memoryview(out.reshape(-1))]


def planned_reads(ck: Checkpoint, tt: TargetTensor) -> list[Span]:
    """The source byte ranges :func:`tensor_chunks` will read for ``tt``, in order."""
    if tt.spec is None:
        return []
    spans: list[Span] = []
    pieces = _piece_spans(ck, tt)
    if pieces is None:
        return []
    compared = False
    for rp in tt.replicas:
        other = ck.ranks[(rp.tp_rank, rp.pp_rank)].span(rp.key)
        if other is not None and not _compare_by_crc(pieces[0][0], other):
            spans += [other] if compared else [pieces[0][0], other]
            compared = True
    d = tt.dim
    if d is None:
        return spans + [pieces[0][0]]
    itemsize = BY_NAME[tt.dtype].itemsize
    for span, shape, pc in pieces:
        outer, _, lo, n = _piece_geometry(shape, d, pc, itemsize)
        # a dim-0 piece is one byte range; other splits read the whole source tensor to gather
        spans.append(Span(span.src, span.offset + lo, n) if outer == 1 else span)
    return spans


def merge_ranges(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """(file, offset, length) ranges sorted, adjacent or overlapping ones merged."""
    out: list[tuple[str, int, int]] = []
    for name, off, n in sorted(ranges):
        if out and out[-1][0] == name and out[-1][1] + out[-1][2] >= off:
            end = max(out[-1][1] + out[-1][2], off + n)
            out[-1] = (name, out[-1][1], end - out[-1][1])
        else:
            out.append((name, off, n))
    return out


def file_reads(ck: Checkpoint, fp: FilePlan) -> tuple[list[tuple[str, int, int]], int]:
    """The source byte ranges the target rank file ``fp`` reads (merged where adjacent), and
    its bytes from computed or in-memory sources (counted as what they produce)."""
    ranges: list[tuple[str, int, int]] = []
    unknown = 0
    for tt in fp.tensors:
        spans = planned_reads(ck, tt)
        if tt.spec is not None and not spans:
            unknown += tt.nbytes
        for span in spans:
            base = getattr(span.src, "base", 0)
            name = getattr(getattr(span.src, "parent", None), "name", None) or span.src.name
            ranges.append((name, base + span.offset, span.length))
    return merge_ranges(ranges), unknown


def announce_reads(ck: Checkpoint, fp: FilePlan) -> None:
    """Tell remote sources which ranges this file will read, so they fetch ahead."""
    by_source: dict[int, tuple[object, list[tuple[int, int]]]] = {}
    for tt in fp.tensors:
        for span in planned_reads(ck, tt):
            if hasattr(span.src, "plan_reads"):
                by_source.setdefault(id(span.src), (span.src, []))[1].append(
                    (span.offset, span.length)
                )
    for src, ranges in by_source.values():
        src.plan_reads(ranges)  # type: ignore[attr-defined]


def stream_blocks(chunks: list[Chunk], scratch: Scratch | None) -> Iterator[memoryview | FileRange]:
    """The chunks' bytes: local file ranges whole (the writer copies them in the kernel), other
    spans in cache-sized blocks read into one reused buffer (each valid until the next)."""
    block = None
    for chunk in chunks:
        if isinstance(chunk, Span):
            local = chunk.local()
            if local is not None:
                src, offset = local
                yield FileRange(
                    src.fd,
                    offset,
                    chunk.length,
                    lambda src=src, o=offset, n=chunk.length: src.read(o, n),
                )
                continue
            if block is None:
                block = memoryview(
                    scratch.take(BLOCK, "block")
                    if scratch is not None
                    else np.empty(BLOCK, np.uint8)
                )
            for off in range(0, chunk.length, BLOCK):
                view = block[: min(BLOCK, chunk.length - off)]
                chunk.readinto(view, off)
                yield view
        else:
            for off in range(0, len(chunk), BLOCK):
                yield chunk[off : off + BLOCK]


def nonfinite_check(ck: Checkpoint, tt: TargetTensor) -> Callable[[memoryview], None]:
    """A scan for NaN/Inf over bytes of ``tt``'s dtype; raises the user-facing error."""
    dtype = tt.spec.dtype if tt.spec is not None else None

    def check(buf: memoryview) -> None:
        if _has_nonfinite(buf, dtype):
            raise _nonfinite_error(ck, tt)

    return check


def make_tensor(
    ck: Checkpoint, tt: TargetTensor, allow_nonfinite: bool = True, scratch: Scratch | None = None
) -> Any:
    """The target tensor of ``tt`` built with torch (any source, any cast).

    A single contiguous piece of the right dtype is returned as is (a view of the source);
    anything else is assembled into ``scratch`` (or a new tensor), valid until the next call.
    """
    import torch

    spec = tt.spec
    assert spec is not None
    parts = [_read_piece(ck, pc, tt.dim) for pc in tt.pieces]
    first = ck.ranks[(tt.pieces[0].tp_rank, tt.pieces[0].pp_rank)].span(tt.pieces[0].key)
    for rp in tt.replicas:
        span = ck.ranks[(rp.tp_rank, rp.pp_rank)].span(rp.key)
        if first is not None and span is not None and _compare_by_crc(first, span):
            if first.crc != span.crc or first.length != span.length:
                raise _replica_error(ck, tt, rp)
            continue  # as tensor_chunks: replicas in object storage compared by record CRC
        other = _read_piece(ck, rp, None)
        if other.shape != parts[0].shape or not torch.equal(
            tensor_bits(other), tensor_bits(parts[0])
        ):
            raise _replica_error(ck, tt, rp)
    if not allow_nonfinite:
        for part in parts:
            if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                raise _nonfinite_error(ck, tt)
    if len(parts) == 1 and parts[0].dtype == spec.dtype and parts[0].is_contiguous():
        return parts[0]
    out = (
        scratch.view(spec.dtype, spec.shape, spec.nbytes)
        if scratch is not None
        else torch.empty(spec.shape, dtype=spec.dtype.torch)
    )
    if len(parts) == 1:
        out.copy_(parts[0])
    elif all(p.dtype == spec.dtype for p in parts):
        torch.cat(parts, dim=tt.dim, out=out)
    else:
        offset = 0
        for part in parts:
            n = part.shape[tt.dim]
            out.narrow(tt.dim, offset, n).copy_(part)
            offset += n
    if not allow_nonfinite and out.is_floating_point() and any(p.dtype != out.dtype for p in parts):
        if not bool(torch.isfinite(out).all()):  # a cast to a narrower type overflowed
            src = str(parts[0].dtype).removeprefix("torch.")
            dst = str(out.dtype).removeprefix("torch.")
            raise CkptError(
                ck.url, f"{src} values overflow {dst} (pass --allow-nonfinite to keep Inf)", tt.key
            )
    return out


def iter_file(
    ck: Checkpoint, fp: FilePlan, allow_nonfinite: bool = True
) -> Iterator[tuple[str, Any]]:
    for tt in fp.tensors:
        yield tt.key, (None if tt.spec is None else make_tensor(ck, tt, allow_nonfinite))


def materialize(ck: Checkpoint, fp: FilePlan) -> OrderedDict:
    """One target rank's state dict in memory (for loading a model, not for conversion)."""
    sd = OrderedDict()
    for key, value in iter_file(ck, fp):
        sd[key] = None if value is None else value.clone()
    meta = fp.metadata_dict()
    if meta is not None:
        sd._metadata = meta  # type: ignore[attr-defined]
    return sd


def file_layout(fp: FilePlan) -> StateDictLayout:
    """The target rank file's pickle and exact size, from the plan alone."""
    return StateDictLayout(
        fp.archive_name, [(tt.key, tt.spec) for tt in fp.tensors], fp.metadata_dict()
    )


# The helper thread of write_rank: how far it may run ahead, in items and gather blocks.
_AHEAD_ITEMS = 32  # queued items: copies of up to COPY_PART bytes, blocks of up to GATHER_BLOCK
COPY_PART = 8 << 20
GATHER_BLOCK = 1 << 20  # gathered rows per block: within the second level cache
_RING = 16  # gather blocks in flight
SCAN_BLOCK = 1 << 20  # bytes read per step for the CRC and the NaN/Inf scan of copied ranges
SEGMENT_COPY = 256 << 10  # split rows at least this long are copied by the kernel, not gathered


class _Stopped(Exception):
    """The writer is gone: the helper thread ends."""


def _local_pieces(
    ck: Checkpoint, tt: TargetTensor
) -> tuple[list[tuple[Span, tuple[int, ...], Piece]], list[tuple[Piece, Span]]] | None:
    """The stored bytes of ``tt`` 's pieces and replicas when all are in local files, else None
    (same checks, in the same order, as :func:`tensor_chunks`)."""
    if tt.spec is None or tt.spec.nbytes == 0:
        return None
    pieces = _piece_spans(ck, tt)
    if pieces is None or any(span.local() is None for span, _, _ in pieces):
        return None
    replicas = []
    for rp in tt.replicas:
        other = ck.ranks[(rp.tp_rank, rp.pp_rank)].span(rp.key)
        if other is None or other.local() is None:
            return None
        replicas.append((rp, other))
    return pieces, replicas


def _pread_full(fd: int, buf: memoryview, offset: int, name: str) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise CkptError(name, f"file shrank while reading at {offset + done}")
        done += n


class _Producer(threading.Thread):
    """Runs ahead of the writing thread through a rank file's tensors (local sources only).

    Per tensor it queues either ``("main", key)``: the writing thread makes it itself (casts,
    remote sources), or ``("tensor", key)`` followed by ``("copy", FileRange)`` items (whole
    source byte ranges, copied by the kernel) or ``("data", view, buffer)`` items (gathered
    blocks, each valid until the next item is taken) and ``("end", crc)``. It reads every byte
    it produces once, in cache-sized blocks, for the NaN/Inf scan and for the CRC-32 where the
    source's stored CRCs do not give it. A failure is queued as ``("error", exc)`` in the order
    of the tensors, so the writer raises it where the sequential code would have.
    """

    def __init__(self, ck: Checkpoint, tensors: list[TargetTensor], scan: bool) -> None:
        super().__init__(name="ckpt-producer", daemon=True)
        self.ck, self.tensors, self.scan = ck, tensors, scan
        self.items: queue.Queue = queue.Queue(_AHEAD_ITEMS)
        self.free: queue.Queue = queue.Queue()
        for _ in range(_RING):
            self.free.put(None)  # a gather block, allocated on first use
        self.stopped = threading.Event()
        self._bufs: dict[str, np.ndarray] = {}

    # -- the writing thread's side ---------------------------------------------------------

    def get(self) -> tuple:
        return self.items.get()

    def release(self, buf: np.ndarray) -> None:
        self.free.put(buf)

    def close(self) -> None:
        self.stopped.set()
        while self.is_alive():
            try:
                while True:
                    self.items.get_nowait()
            except queue.Empty:
                pass
            self.free.put(None)
            self.join(0.01)

    # -- the helper thread ---------------------------------------------------------------------

    def _put(self, item: tuple) -> None:
        if self.stopped.is_set():
            raise _Stopped
        self.items.put(item)

    def _buf(self, slot: str, nbytes: int) -> np.ndarray:
        buf = self._bufs.get(slot)
        if buf is None or buf.nbytes < nbytes:
            self._bufs.pop(slot, None)
            buf = self._bufs[slot] = np.zeros(max(nbytes, 1), np.uint8)  # zeros: fault in once
        return buf

    def run(self) -> None:
        try:
            for tt in self.tensors:
                local = _local_pieces(self.ck, tt)
                if local is None:
                    self._put(("main", tt.key))
                    continue
                self._put(("tensor", tt.key))
                self._tensor(tt, *local)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 -- handed to the writing thread
            try:
                self._put(("error", exc))
            except _Stopped:
                pass

    def _tensor(
        self,
        tt: TargetTensor,
        pieces: list[tuple[Span, tuple[int, ...], Piece]],
        replicas: list[tuple[Piece, Span]],
    ) -> None:
        first = pieces[0][0]
        d = tt.dim
        if d is None:  # one whole tensor: its replicas are compared while it is scanned
            self._ranges(tt, [first], replicas)
            return
        if replicas:
            self._check_replicas(tt, first, replicas)
        itemsize = BY_NAME[tt.dtype].itemsize
        geometry = [(span, *_piece_geometry(shape, d, pc, itemsize)) for span, shape, pc in pieces]
        if all(outer == 1 for _, outer, _, _, _ in geometry):  # dim-0 pieces: byte ranges
            self._ranges(tt, [_subspan(span, lo, n) for span, _, _, lo, n in geometry])
        elif min(n for *_, n in geometry) >= SEGMENT_COPY:  # long rows: copy each piece row
            outer = geometry[0][1]
            self._ranges(
                tt,
                [
                    Span(span.src, span.offset + r * row + lo, n)
                    for r in range(outer)
                    for span, _, row, lo, n in geometry
                ],
            )
        else:
            self._gather(tt, geometry)

    def _read(self, src: Any, offset: int, n: int, slot: str) -> np.ndarray:
        """``n`` bytes of a local file read into the reused buffer ``slot``: one copy from the page
        cache into a cache-sized buffer (measured as fast as reading through the mmap, whose
        faults cost as much, and the source's pages are not mapped into this process)."""
        buf = self._buf(slot, n)[:n]
        _pread_full(src.fd, memoryview(buf), offset, src.name)
        return buf

    def _differ(
        self, mine: np.ndarray, pos: int, replicas: list[tuple[Piece, Span]], bad: list[bool]
    ) -> None:
        """Mark the replicas whose bytes at ``pos`` differ from ``mine``."""
        for i, (_, other) in enumerate(replicas):
            if not bad[i]:
                src, offset = other.local()  # type: ignore[misc]
                bad[i] = not np.array_equal(mine, self._read(src, offset + pos, len(mine), "other"))

    def _raise_replica(self, tt: TargetTensor, replicas, bad: list[bool]) -> None:
        """The first replica in order that differs is the error, as in :func:`tensor_chunks`."""
        for (rp, _), differs in zip(replicas, bad, strict=True):
            if differs:
                raise _replica_error(self.ck, tt, rp)

    def _check_replicas(
        self, tt: TargetTensor, first: Span, replicas: list[tuple[Piece, Span]]
    ) -> None:
        """Compare ``first`` with its replicas byte for byte, reading it once per block."""
        src, offset = first.local()  # type: ignore[misc]
        bad = [other.length != first.length for _, other in replicas]
        for pos in range(0, first.length, SCAN_BLOCK):
            if all(bad):
                break
            n = min(SCAN_BLOCK, first.length - pos)
            self._differ(self._read(src, offset + pos, n, "scan"), pos, replicas, bad)
        self._raise_replica(tt, replicas, bad)

    def _ranges(
        self, tt: TargetTensor, spans: list[Span], replicas: list[tuple[Piece, Span]] = ()
    ) -> None:
        """Whole byte ranges: copied by the writer, read here once for the NaN/Inf scan, a CRC
        the source does not give and the comparison with the ``replicas`` of a single whole
        span. Errors are raised once the tensor is read, a differing replica first, as the
        sequential code orders them."""
        crc = known_crc(spans)
        read = self.scan or crc is None or bool(replicas)
        bad = [other.length != spans[0].length for _, other in replicas]
        running = 0
        nonfinite = False
        dtype = tt.dtype
        tmp = self._buf("bits", SCAN_BLOCK) if self.scan else None
        for span in spans:
            src, offset = span.local()  # type: ignore[misc]
            for part in range(0, span.length, COPY_PART):
                start, n = offset + part, min(COPY_PART, span.length - part)
                self._put(
                    (
                        "copy",
                        FileRange(src.fd, start, n, lambda src=src, o=start, n=n: src.read(o, n)),
                    )
                )
                if not read:
                    continue
                for off in range(0, n, SCAN_BLOCK):
                    view = self._read(src, start + off, min(SCAN_BLOCK, n - off), "scan")
                    if replicas:
                        self._differ(view, part + off, replicas, bad)
                    if self.scan and not nonfinite:
                        nonfinite = _has_nonfinite(view, dtype, tmp)
                    if crc is None:
                        running = crc32_array(view, running)
        self._raise_replica(tt, replicas, bad)
        if nonfinite:
            raise _nonfinite_error(self.ck, tt)
        self._put(("end", running if crc is None else crc))

    def _gather(self, tt: TargetTensor, geometry: list[tuple[Span, int, int, int, int]]) -> None:
        """Rows split along a later dim: gathered block by block into a ring of buffers."""
        outer = geometry[0][1]
        width = sum(n for *_, n in geometry)
        rows = max(1, GATHER_BLOCK // width)
        pieces = []
        for span, _, row, lo, n in geometry:
            src, offset = span.local()  # type: ignore[misc]
            pieces.append((src, offset, row, lo, n))
        dtype = tt.dtype
        running = 0
        for r0 in range(0, outer, rows):
            k = min(rows, outer - r0)
            buf = self.free.get()
            while buf is None or buf.nbytes < rows * width:
                if self.stopped.is_set():
                    raise _Stopped
                buf = np.zeros(max(rows * width, GATHER_BLOCK), np.uint8)  # fault in once
            out = buf[: k * width].reshape(k, width)
            col = 0
            for src, offset, row, lo, n in pieces:
                rows_in = self._read(src, offset + r0 * row, k * row, "rows")
                out[:, col : col + n] = rows_in.reshape(k, row)[:, lo : lo + n]
                col += n
            block = buf[: k * width]
            if self.scan and _has_nonfinite(block, dtype, self._buf("bits", k * width)):
                self.free.put(buf)
                raise _nonfinite_error(self.ck, tt)
            running = crc32_array(block, running)
            self._put(("data", memoryview(block), buf))
        self._put(("end", running))


def write_rank(
    ck: Checkpoint,
    fp: FilePlan,
    sink: Sink,
    layout: StateDictLayout | None = None,
    allow_nonfinite: bool = True,
    on_tensor: Progress | None = None,
) -> int:
    """Stream one target rank file into ``sink``; returns its size.

    Tensors from local files are produced ahead by a helper thread (:class:`_Producer`); the
    others (casts, remote sources, in-memory tensors) are made here, one at a time.
    """
    layout = layout or file_layout(fp)
    by_key = {tt.key: tt for tt in fp.tensors}
    scratch = Scratch()
    announce_reads(ck, fp)
    reserve = getattr(sink, "reserve", None)
    if reserve is not None:  # a local file: its disk blocks allocated at once
        reserve(layout.size)
    producer = _Producer(ck, [by_key[key] for key, _ in layout.tensors], not allow_nonfinite)
    producer.start()

    def produced(result: list[int]) -> Iterator[FileRange | memoryview]:
        while True:
            item = producer.get()
            kind = item[0]
            if kind == "copy":
                yield item[1]
            elif kind == "data":
                yield item[1]
                producer.release(item[2])
            elif kind == "end":
                result.append(item[1])
                return
            else:
                raise item[1]

    def fill(key: str):
        item = producer.get()
        if item[0] == "error":
            raise item[1]
        if item[1] != key:
            raise AssertionError(f"producer at {item[1]}, writer at {key}")
        if item[0] == "tensor":
            result: list[int] = []
            return produced(result), lambda: result[0], None
        tt = by_key[key]
        chunks = tensor_chunks(ck, tt, scratch)
        if chunks is None:
            return make_tensor(ck, tt, allow_nonfinite, scratch)
        check = None if allow_nonfinite else nonfinite_check(ck, tt)
        return stream_blocks(chunks, scratch), known_crc(chunks), check

    try:
        return layout.write(sink, fill, on_tensor)
    finally:
        producer.close()


def write_file(
    ck: Checkpoint,
    fp: FilePlan,
    out_dir: str,
    allow_nonfinite: bool = True,
    on_tensor: Progress | None = None,
) -> str:
    """Write one target rank file under ``out_dir`` (NeMo's path and record prefix); its path."""
    final = os.path.join(out_dir, fp.path)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = final + ".partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_rank(ck, fp, file_sink(fd, write_behind=False), None, allow_nonfinite, on_tensor)
        os.close(fd)
        fd = -1
        os.replace(tmp, final)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


def execute(
    plan: Plan,
    ck: Checkpoint,
    out_dir: str,
    workers: int = 1,
    allow_nonfinite: bool = True,
    on_tensor: Progress | None = None,
) -> list[str]:
    """Write every target rank file of ``plan`` into ``out_dir``; ``workers`` files at a time."""
    if workers <= 1 or len(plan.files) == 1:
        return [write_file(ck, fp, out_dir, allow_nonfinite, on_tensor) for fp in plan.files]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(write_file, ck, fp, out_dir, allow_nonfinite, on_tensor)
            for fp in plan.files
        ]
        return [f.result() for f in futures]
