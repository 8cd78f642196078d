"""The streaming engine: execute a plan one target file, one tensor at a time.

Each target tensor is made from its source pieces. Where the bytes allow it, no tensor is built at
all: a copied or dim-0-concatenated tensor is a list of byte ranges of the (mmapped) sources,
written straight to the output; a split along another dim is gathered into one reusable buffer.
Only casts and unusual sources go through torch. Anonymous memory therefore stays near the
largest tensor, and every output byte is written once, straight into its final place.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ckptcore.dtypes import BY_NAME, dtype_name
from ckptcore.errors import CkptError
from ckptcore.formats.torchzip import StateDictLayout
from ckptcore.formats.zipwriter import FileRange, Sink, file_sink
from ckptcore.plan import FilePlan, Piece, Plan, TargetTensor
from ckptcore.sources import Checkpoint
from ckptcore.storage import Span

Progress = Callable[[str, int], None]

# NaN/Inf test per dtype: the exponent bits all set (numpy view dtype, mask)
_NONFINITE = {
    "float32": (np.uint32, 0x7F800000),
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
    "float64": (np.uint64, 0x7FF0000000000000),
}
_NUMPY_FLOAT = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
BLOCK = 4 << 20  # bytes moved per step: source -> buffer (checks, CRC) -> sink, cache-sized


def _read_piece(ck: Checkpoint, pc: Piece, dim: int | None) -> Any:
    t = ck.ranks[(pc.tp_rank, pc.pp_rank)].tensor(pc.key)
    if pc.start is not None and dim is not None:
        t = t.narrow(dim, pc.start, pc.length)
    return t


def _bits(t: Any) -> Any:
    return t.contiguous().reshape(-1).view(dtype_name("uint8").torch)


def _has_nonfinite(buf, dtype: Any) -> bool:
    """NaN/Inf anywhere in ``buf`` (raw bytes of ``dtype``)."""
    dtype = dtype_name(dtype)
    if len(buf) == 0 or dtype not in _NONFINITE:
        return False
    if dtype in _NUMPY_FLOAT:
        arr = np.frombuffer(buf, dtype=_NUMPY_FLOAT[dtype])
        return not bool(np.isfinite(arr).all())
    view_type, mask = _NONFINITE[dtype]
    arr = np.frombuffer(buf, dtype=view_type)
    return bool(np.any(np.bitwise_and(arr, mask) == mask))


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


def _compare_by_crc(a: Span, b: Span) -> bool:
    """Replicas in object storage are compared by their zip records' CRC-32: no bytes fetched."""
    return (a.remote or b.remote) and a.crc is not None and b.crc is not None


def _read_span(span: Span, scratch: Scratch | None, slot: str) -> memoryview:
    buf = memoryview(
        scratch.take(span.length, slot) if scratch is not None else np.empty(span.length, np.uint8)
    )
    span.readinto(buf)
    return buf


def tensor_chunks(
    ck: Checkpoint, tt: TargetTensor, scratch: Scratch | None = None
) -> list[Chunk] | None:
    """The target tensor's bytes as source spans (or one gathered buffer), without building a
    tensor; None where that is not possible (casts, views, sources without stored bytes)."""
    spec = tt.spec
    assert spec is not None
    spans = []
    for pc in tt.pieces:
        sr = ck.ranks[(pc.tp_rank, pc.pp_rank)]
        value = sr.state[pc.key]
        if value is None or value.dtype != spec.dtype:
            return None
        span = sr.span(pc.key)
        if span is None:
            return None
        spans.append((span, tuple(value.shape)))
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
    for (span, shape), pc in zip(spans, tt.pieces, strict=True):
        geometry.append((span, *_piece_geometry(shape, d, pc, itemsize)))
    if all(outer == 1 for _, outer, _, _, _ in geometry):  # dim-0 pieces: contiguous byte ranges
        return [Span(span.src, span.offset + lo, n) for span, _, _, lo, n in geometry]
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
    pieces = []
    for pc in tt.pieces:
        sr = ck.ranks[(pc.tp_rank, pc.pp_rank)]
        value = sr.state[pc.key]
        span = sr.span(pc.key) if value is not None and value.dtype == tt.spec.dtype else None
        if span is None:
            return []
        pieces.append((span, tuple(value.shape), pc))
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
    for rp in tt.replicas:
        other = _read_piece(ck, rp, None)
        if other.shape != parts[0].shape or not torch.equal(_bits(other), _bits(parts[0])):
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


def write_rank(
    ck: Checkpoint,
    fp: FilePlan,
    sink: Sink,
    layout: StateDictLayout | None = None,
    allow_nonfinite: bool = True,
    on_tensor: Progress | None = None,
) -> int:
    """Stream one target rank file into ``sink``; returns its size."""
    layout = layout or file_layout(fp)
    by_key = {tt.key: tt for tt in fp.tensors}
    scratch = Scratch()
    announce_reads(ck, fp)

    def fill(key: str):
        tt = by_key[key]
        chunks = tensor_chunks(ck, tt, scratch)
        if chunks is None:
            return make_tensor(ck, tt, allow_nonfinite, scratch)
        check = None if allow_nonfinite else nonfinite_check(ck, tt)
        return stream_blocks(chunks, scratch), None, check

    return layout.write(sink, fill, on_tensor)


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
        write_rank(ck, fp, file_sink(fd), None, allow_nonfinite, on_tensor)
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
