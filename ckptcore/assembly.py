"""Archives assembled where the work runs: many writers, one ``.nemo``, no funnel.

Every member's size is known from the plan, so every byte's place in the final archive is known
before a byte is written (:func:`ckptcore.formats.nemo.archive_layout`). :func:`plan_assembly`
cuts the archive into *pieces*, each one or more consecutive members (header, data, padding)
that one work item writes where it runs, straight to its place (:func:`write_piece`):

- a local or shared-folder archive: at its offset in one file every writer opens (``pwrite``);
- an ``s3://`` archive: as parts of one multipart upload. S3's parts are independent, but every
  part but the last must be at least 5 MiB: a piece is at least that long (small members ride
  with the rank file after them) and a piece longer than the part size goes as several parts.

The *tail* is what follows the pieces: the rank files too short to make an S3 part of their own,
the trailer (``lineage.json``, last, so the model's bytes never move with its size) and the end
of the archive. Whoever completes the archive writes it (:func:`write_tail`) once the trailer is
known, then commits (:func:`commit_archive`): the upload is completed, or the work file renamed
into place. Before that nothing is visible at the destination; :func:`abort_archive` drops it.

Each piece writer checks what it wrote (:func:`check_members`): the rank files are read back
and every tensor compared, dtype, shape and bits, with the same slice taken from the source.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ckptcore.engine import file_layout, file_reads, make_tensor, tensor_bits, write_rank
from ckptcore.errors import CkptError, write_error
from ckptcore.formats.nemo import (
    TRAILER,
    MemberData,
    MemberSource,
    Placement,
    archive_layout,
    default_mtime,
    write_member_at,
)
from ckptcore.multipart import (
    MAX_PARTS,
    MIN_PART_BYTES,
    abort_upload,
    complete_upload,
    create_upload,
    is_s3,
    part_size_for,
    upload_part,
)
from ckptcore.output import (
    destination_lock,
    fsync_dir,
    new_work_file,
    process_folder,
    remove_stale,
)
from ckptcore.plan import FilePlan
from ckptcore.sources import Checkpoint, open_checkpoint, torch_rank
from ckptcore.storage import LocalFile, SubRange, is_local, local_path


@dataclass(frozen=True)
class Piece:
    """Consecutive members one writer puts at ``[start, end)`` of the archive; ``parts``:
    ``(part number, start, end)`` of its multipart upload parts (an ``s3://`` archive)."""

    index: int
    start: int
    end: int
    placements: tuple[Placement, ...]
    parts: tuple[tuple[int, int, int], ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.start

    def files(self) -> list[str]:
        """The members with data in this piece (folders have none)."""
        return [p.rel for p in self.placements if p.rel is not None]


@dataclass(frozen=True)
class Assembly:
    """An archive cut into pieces for many writers, and the tail its completer writes."""

    sizes: dict[str, int]  # every member but the trailer
    work: tuple[str, ...]  # the members work items produce (rank files)
    pieces: tuple[Piece, ...]
    tail: tuple[Placement, ...]  # members after the last piece, before the trailer
    tail_start: int
    mtime: int
    part_bytes: int | None  # None: a file archive (no part sizes)

    @property
    def tail_part(self) -> int:
        """The tail's part number (an ``s3://`` archive): after every piece's."""
        return max((n for p in self.pieces for n, _, _ in p.parts), default=0) + 1

    def trailer_layout(self, trailer_size: int) -> tuple[list[Placement], int]:
        """The tail's placements with a trailer of ``trailer_size`` bytes, and the archive's
        total size."""
        placements, total = archive_layout({**self.sizes, TRAILER: trailer_size}, self.mtime)
        tail = [p for p in placements if p.offset >= self.tail_start]
        return tail, total


def plan_assembly(
    sizes: dict[str, int],
    work: list[str],
    *,
    part_bytes: int | None = None,
    min_part: int = MIN_PART_BYTES,
    mtime: int | None = None,
) -> Assembly:
    """Cut the archive of members ``sizes`` (the trailer apart) into pieces.

    ``work``: the members work items produce; each piece ends with one of them, and the small
    members before it (the config, folders) ride with it. A file archive (``part_bytes``
    None): one piece per work member. An ``s3://`` archive: pieces of at least ``min_part``
    bytes, each sent as ``size // part_bytes`` parts (at least one, each at least
    ``part_bytes``); what is left after the last full piece joins it, and where no piece can
    be that long, the tail takes everything."""
    if TRAILER in sizes:
        raise CkptError(TRAILER, "is the archive's trailer; it is written by the tail")
    mtime = default_mtime() if mtime is None else mtime
    placements, _ = archive_layout({**sizes, TRAILER: 0}, mtime)
    body = [p for p in placements if p.rel != TRAILER]
    work_set = set(work)
    minimum = 0 if part_bytes is None else max(min_part, 1)
    groups: list[list[Placement]] = []
    current: list[Placement] = []
    for p in body:
        current.append(p)
        if p.rel in work_set and current[-1].end - current[0].offset >= minimum:
            groups.append(current)
            current = []
    if current and any(p.rel in work_set for p in current) and groups and part_bytes is not None:
        groups[-1].extend(current)  # too short for a part of its own: rides with the last piece
        current = []
    pieces, number = [], 1
    for index, group in enumerate(groups):
        start, end = group[0].offset, group[-1].end
        parts: tuple[tuple[int, int, int], ...] = ()
        if part_bytes is not None:
            count = max(1, (end - start) // part_bytes)
            bounds = [start + (end - start) * k // count for k in range(count + 1)]
            parts = tuple((number + k, bounds[k], bounds[k + 1]) for k in range(count))
            number += count
        pieces.append(Piece(index, start, end, tuple(group), parts))
    tail_start = pieces[-1].end if pieces else 0
    return Assembly(
        dict(sizes), tuple(work), tuple(pieces), tuple(current), tail_start, mtime, part_bytes
    )


# ------------------------------------------------------------------------------ the archive


@dataclass(frozen=True)
class ArchiveTarget:
    """Where an assembly is written: ``url`` (the destination), and either ``upload_id`` (its
    multipart upload) or ``path`` (the work file beside a local destination, renamed into
    place at the commit)."""

    url: str
    upload_id: str | None = None
    path: str | None = None


def begin_archive(
    url: str,
    assembly: Assembly,
    *,
    metadata: dict[str, str] | None = None,
    checksum: str | None = "CRC32",
) -> ArchiveTarget:
    """Open the archive for its writers: an ``s3://`` destination's multipart upload, or a
    work file beside a local one (named like :func:`ckptcore.output.atomic_output`'s, so a
    killed run's is removed by the next), sized to the pieces' end."""
    if is_s3(url):
        return ArchiveTarget(url, upload_id=create_upload(url, metadata, None, checksum))
    final = os.path.abspath(local_path(url))
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        with destination_lock(url):
            remove_stale(final)
        path = new_work_file(final)
        with open(path, "wb") as f:
            f.truncate(assembly.tail_start)
    except OSError as exc:
        raise write_error(url, "cannot write", exc) from None
    return ArchiveTarget(url, path=path)


def _target_fd(target: ArchiveTarget) -> int:
    if target.path is None:
        raise CkptError(target.url, "is not a file archive")
    try:
        return os.open(target.path, os.O_RDWR)
    except OSError as exc:
        raise write_error(target.url, f"cannot open the work file {target.path}", exc) from None


@dataclass(frozen=True)
class PieceResult:
    """One written piece: bytes written, its parts' completion entries (``s3://``), the members
    and tensors checked."""

    index: int
    written_bytes: int
    parts: tuple[dict[str, Any], ...] = ()
    members: tuple[str, ...] = ()
    tensors_checked: int = 0
    checked: bool = False
    ranks_checked: int = 0  # rank files among the members, read back and compared
    check_seconds: float = 0.0
    read_bytes: int = 0  # source bytes its rank files' plan reads


def _emit_piece(
    fd: int,
    placements: tuple[Placement, ...] | list[Placement],
    produce: Callable[[str], MemberData],
    base: int,
    progress: Callable[[int], object] | None = None,
) -> int:
    written = 0
    for placement in placements:
        data: MemberData = b"" if placement.rel is None else produce(placement.rel)
        write_member_at(fd, placement, data, base, progress)
        written += len(placement.header) + placement.size
    if progress is not None:
        progress(placements[-1].end - base if placements else 0)  # the padding: zeros already
    return written


def plan_sizes(files: list[FilePlan]) -> dict[str, int]:
    """Each target rank file's exact size, from the plan alone (no source byte is read)."""
    return {fp.path: file_layout(fp).size for fp in files}


def rank_member(ck: Checkpoint, fp: FilePlan) -> MemberSource:
    """The target rank file ``fp`` as a member produced from ``ck`` on demand."""
    layout = file_layout(fp)
    return MemberSource(
        layout.size, lambda sink: write_rank(ck, fp, sink, layout, allow_nonfinite=False)
    )


def check_members(
    ck: Checkpoint,
    files: dict[str, FilePlan],
    path: str,
    placements: list[Placement] | tuple[Placement, ...],
    base: int = 0,
) -> int:
    """Read the rank files at ``placements`` back from ``path`` (a file holding the archive
    from offset ``base``) and compare every tensor, dtype, shape and bits, with the same slice
    of the source ``ck``; the number of tensors compared. A difference is an error naming the
    member and the key."""
    import torch

    checked = 0
    f = LocalFile(path)
    try:
        for placement in placements:
            fp = files.get(placement.rel or "")
            if fp is None:
                continue
            src = SubRange(f, placement.data_offset - base, placement.size, placement.name)
            rank = torch_rank(src, fp.tp_rank, fp.pp_rank)
            expected = [tt.key for tt in fp.tensors]
            if list(rank.state) != expected:
                raise CkptError(placement.name, "holds other keys than the plan's")
            for tt in fp.tensors:
                if tt.spec is None:
                    if rank.state[tt.key] is not None:
                        raise CkptError(placement.name, "holds a tensor the plan has not", tt.key)
                    continue
                got, want = rank.tensor(tt.key), make_tensor(ck, tt)
                if got.dtype != want.dtype or got.shape != want.shape:
                    raise CkptError(
                        placement.name,
                        f"holds {got.dtype} {tuple(got.shape)}, the source slice is "
                        f"{want.dtype} {tuple(want.shape)}",
                        tt.key,
                    )
                if not torch.equal(tensor_bits(got), tensor_bits(want)):
                    raise CkptError(placement.name, "differs from its source slice", tt.key)
                checked += 1
    finally:
        f.close()
    return checked


def write_piece(
    source: str,
    checkpoint: str,
    files: dict[str, FilePlan],
    small: dict[str, bytes],
    piece: Piece,
    target: ArchiveTarget,
    *,
    check: bool = True,
    concurrency: int = 4,
    checksum: str | None = "CRC32",
    before_writing: Callable[[], None] | None = None,
    cache: str | None = None,
) -> PieceResult:
    """Write ``piece`` where this runs: its rank files produced from ``source`` (opened here,
    read by ranges), the ``small`` members' given bytes, straight to the archive (a file: at
    their offsets; ``s3://``: through a local spool file, as the piece's parts), then, with
    ``check``, read back and compared with the source (:func:`check_members`). A remote
    source's ranges are kept in a local range cache while the piece is written (``cache``, a
    folder shared with other readers on this machine, else one of the piece's own), so the check
    reads them from disk, not the store. Memory stays near the largest tensor slice; the
    spool and the piece's cache are removed at the end (a killed writer's by the next one)."""
    if before_writing is not None:
        before_writing()
    folder = process_folder(kind="ckpt-piece")
    try:
        if cache is None and not is_local(source):
            cache = os.path.join(folder, "ranges")
        with open_checkpoint(source, checkpoint, cache=cache) as ck:

            def produce(rel: str) -> MemberData:
                if rel in files:
                    return rank_member(ck, files[rel])
                if rel in small:
                    return small[rel]
                raise CkptError(target.url, f"no data for the member {rel}")

            if target.upload_id is None:
                fd = _target_fd(target)
                try:
                    written = _emit_piece(fd, piece.placements, produce, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                path, base, parts = target.path or "", 0, ()
                sender = None
            else:
                path, base = os.path.join(folder, "piece"), piece.start
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                sender = _PartSender(path, piece, target, concurrency, checksum)
                try:
                    os.ftruncate(fd, piece.size)
                    written = _emit_piece(fd, piece.placements, produce, base, sender.written)
                except BaseException:
                    sender.close()
                    raise
                finally:
                    os.close(fd)
            try:  # the parts go up while the piece is checked; none counts before the commit
                started = time.perf_counter()
                tensors = check_members(ck, files, path, piece.placements, base) if check else 0
                check_seconds = time.perf_counter() - started
                if sender is not None:
                    parts = sender.wait()
            finally:
                if sender is not None:
                    sender.close()
            reads = sum(_read_bytes(ck, fp) for fp in files.values())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _result(piece, files, written, parts, tensors, check, check_seconds, reads)


def _read_bytes(ck: Checkpoint, fp: FilePlan) -> int:
    ranges, produced = file_reads(ck, fp)
    return sum(n for _, _, n in ranges) + produced


def _result(
    piece: Piece,
    files: dict[str, FilePlan],
    written: int,
    parts: tuple[dict[str, Any], ...],
    tensors: int,
    check: bool,
    check_seconds: float,
    read_bytes: int,
) -> PieceResult:
    ranks = sum(1 for rel in piece.files() if rel in files) if check else 0
    return PieceResult(
        piece.index, written, parts, tuple(piece.files()), tensors, check, ranks, check_seconds,
        read_bytes,
    )  # fmt: skip


class _PartSender:
    """Sends a piece's parts from its spool file as soon as the writer has passed each part's
    end (:meth:`written`), ``concurrency`` at a time."""

    def __init__(
        self, path: str, piece: Piece, target: ArchiveTarget, concurrency: int, checksum: str | None
    ) -> None:
        assert target.upload_id is not None
        self.piece, self.target, self.checksum = piece, target, checksum
        self.upload_id = target.upload_id
        self.fd = os.open(path, os.O_RDONLY)
        self.pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="ckpt-part")
        self.futures: list[Future] = []
        self.next = 0  # the first part not yet sent

    def written(self, position: int) -> None:
        """The spool file is written up to ``position`` (relative to the piece's start)."""
        parts = self.piece.parts
        while self.next < len(parts) and parts[self.next][2] - self.piece.start <= position:
            self.futures.append(self.pool.submit(self._send, parts[self.next]))
            self.next += 1

    def _send(self, part: tuple[int, int, int]) -> dict[str, Any]:
        number, start, end = part
        data = os.pread(self.fd, end - start, start - self.piece.start)
        if len(data) != end - start:
            raise CkptError(self.target.url, f"part {number}: the spool file ended early")
        return upload_part(self.target.url, self.upload_id, number, data, self.checksum)

    def wait(self) -> tuple[dict[str, Any], ...]:
        if self.next != len(self.piece.parts):
            raise CkptError(self.target.url, "the piece ended before its last part")
        return tuple(f.result() for f in self.futures)

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        self.pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Tail:
    """What :func:`write_tail` wrote: the archive's size, the bytes written here, the tail's
    part entry (``s3://``), its members, and the rank files and tensors checked among them."""

    size_bytes: int
    written_bytes: int
    part: dict[str, Any] | None = None
    members: tuple[str, ...] = field(default_factory=tuple)
    ranks_checked: int = 0
    tensors_checked: int = 0


def write_tail(
    assembly: Assembly,
    target: ArchiveTarget,
    trailer: bytes,
    produce: Callable[[str], MemberData],
    *,
    checksum: str | None = "CRC32",
    check: tuple[Checkpoint, dict[str, FilePlan]] | None = None,
) -> Tail:
    """Write the tail: the members after the last piece (``produce`` gives their data), the
    trailer and the end of the archive; an ``s3://`` archive's as its last part. ``check``:
    the source and the plans of the tail's rank files, read back and compared as a piece's."""
    placements, total = assembly.trailer_layout(len(trailer))

    def data(rel: str) -> MemberData:
        return trailer if rel == TRAILER else produce(rel)

    members = tuple(p.rel for p in placements if p.rel is not None and p.rel != TRAILER)
    files = check[1] if check is not None else {}
    ranks = sum(1 for rel in members if rel in files)

    def checked(path: str, base: int) -> int:
        return check_members(check[0], files, path, placements, base) if check else 0

    if target.upload_id is None:
        fd = _target_fd(target)
        try:
            _emit_piece(fd, placements, data, 0)
            os.ftruncate(fd, total)  # the end blocks: zeros
            os.fsync(fd)
        finally:
            os.close(fd)
        tensors = checked(target.path or "", 0)
        return Tail(total, total - assembly.tail_start, None, members, ranks, tensors)
    folder = process_folder(kind="ckpt-piece")
    spool = os.path.join(folder, "tail")
    try:
        fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, total - assembly.tail_start)
            _emit_piece(fd, placements, data, assembly.tail_start)
            body = os.pread(fd, total - assembly.tail_start, 0)
        finally:
            os.close(fd)
        tensors = checked(spool, assembly.tail_start)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    part = upload_part(target.url, target.upload_id, assembly.tail_part, body, checksum)
    return Tail(total, len(body), part, members, ranks, tensors)


def commit_archive(target: ArchiveTarget, parts: list[dict[str, Any]]) -> None:
    """Make the archive visible at its destination: complete the upload with ``parts``, or
    rename the work file into place (under the destination's lock)."""
    if target.upload_id is not None:
        complete_upload(target.url, target.upload_id, parts)
        return
    assert target.path is not None
    final = os.path.abspath(local_path(target.url))
    try:
        with destination_lock(target.url):
            os.replace(target.path, final)
            fsync_dir(os.path.dirname(final))
    except OSError as exc:
        raise write_error(target.url, "cannot write", exc) from None


def abort_archive(target: ArchiveTarget) -> None:
    """Drop an archive that was not committed: nothing appears at the destination."""
    if target.upload_id is not None:
        abort_upload(target.url, target.upload_id)
    elif target.path is not None:
        try:
            os.unlink(target.path)
        except FileNotFoundError:
            pass


def assembly_for(
    url: str,
    sizes: dict[str, int],
    work: list[str],
    *,
    part_bytes: int = 64 << 20,
    min_part: int = MIN_PART_BYTES,
) -> Assembly:
    """:func:`plan_assembly` for the destination ``url``: parts (of at least ``part_bytes``,
    raised to fit S3's 10,000 parts) for ``s3://``, one piece per rank file otherwise."""
    if not is_s3(url):
        return plan_assembly(sizes, work)
    total = sum(sizes.values())
    part = part_size_for(total, part_bytes)
    # pieces of many small rank files: long enough that all fit in S3's 10,000 parts
    minimum = max(min_part, -(-total // (MAX_PARTS - 1000)))
    return plan_assembly(sizes, work, part_bytes=max(part, minimum), min_part=minimum)


__all__ = [
    "ArchiveTarget",
    "Assembly",
    "Piece",
    "PieceResult",
    "Tail",
    "abort_archive",
    "assembly_for",
    "begin_archive",
    "check_members",
    "commit_archive",
    "plan_assembly",
    "plan_sizes",
    "rank_member",
    "write_piece",
    "write_tail",
]
