"""Work items: a plan's target rank files as independent jobs, with the bytes each reads and writes.

``work_items(ck, plan)`` gives, per target rank file, the exact source byte ranges it reads (file,
offset, length; merged where adjacent) and the size of the file it writes: JSON-serialisable, so a
scheduler can hand items to different machines. :func:`write_work_item` carries one out where
it runs: it opens the source itself and streams its one rank file to a URL;
:func:`write_work_item_in_place` writes it straight to its place in the final archive.
``estimate`` turns items into an expected wall time for N workers of a given bandwidth (greedy
longest-first assignment).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ckptcore.engine import file_layout, planned_reads, write_file, write_rank
from ckptcore.errors import CkptError
from ckptcore.formats.nemo import MemberSource, Placement, write_member_at
from ckptcore.plan import FilePlan, Plan
from ckptcore.sources import Checkpoint, open_checkpoint
from ckptcore.storage import RangeCache, get_fs, is_local, local_path


@dataclass
class WorkItem:
    path: str  # the target rank file inside the .nemo
    tp_rank: int
    pp_rank: int
    tensors: int
    read_bytes: int
    write_bytes: int
    reads: list[tuple[str, int, int]] = field(default_factory=list)  # (file, offset, length)

    def to_dict(self) -> dict:
        return asdict(self)


def _merge(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for name, off, n in sorted(ranges):
        if out and out[-1][0] == name and out[-1][1] + out[-1][2] >= off:
            end = max(out[-1][1] + out[-1][2], off + n)
            out[-1] = (name, out[-1][1], end - out[-1][1])
        else:
            out.append((name, off, n))
    return out


def work_items(ck: Checkpoint, plan: Plan, with_ranges: bool = True) -> list[WorkItem]:
    items = []
    for fp in plan.files:
        ranges: list[tuple[str, int, int]] = []
        unknown = 0
        for tt in fp.tensors:
            spans = planned_reads(ck, tt)
            if tt.spec is not None and not spans:
                unknown += tt.nbytes  # computed or in-memory sources: counted as what they produce
            for span in spans:
                base = getattr(span.src, "base", 0)
                name = getattr(getattr(span.src, "parent", None), "name", None) or span.src.name
                ranges.append((name, base + span.offset, span.length))
        merged = _merge(ranges)
        items.append(
            WorkItem(
                path=fp.path,
                tp_rank=fp.tp_rank,
                pp_rank=fp.pp_rank,
                tensors=sum(1 for t in fp.tensors if t.spec is not None),
                read_bytes=sum(n for _, _, n in merged) + unknown,
                write_bytes=file_layout(fp).size,
                reads=merged if with_ranges else [],
            )
        )
    return items


def estimate(items: list[WorkItem], workers: int, gbps_per_worker: float) -> dict:
    """Expected wall time: items assigned longest first to the least-loaded worker; each worker
    moves read + write bytes at ``gbps_per_worker``."""
    loads = [0] * max(1, workers)
    for item in sorted(items, key=lambda i: i.read_bytes + i.write_bytes, reverse=True):
        k = loads.index(min(loads))
        loads[k] += item.read_bytes + item.write_bytes
    seconds = max(loads) / (gbps_per_worker * 1e9)
    return {"workers": workers, "seconds": seconds, "busiest_worker_bytes": max(loads)}


def _complete_at(url: str, size: int) -> bool:
    fs, path = get_fs(url)
    try:
        return int(fs.size(path)) == size
    except FileNotFoundError:
        return False


def write_work_item(
    source: str,
    checkpoint: str,
    fp: FilePlan,
    url: str,
    *,
    cache: RangeCache | str | None = None,
    part_bytes: int = 64 << 20,
    before_writing: Callable[[], None] | None = None,
) -> tuple[int, bool]:
    """The target rank file ``fp`` streamed from ``source`` (opened here, read by ranges) to
    ``url``; ``(size, resumed)``, ``resumed`` when a complete file of the planned size was
    there already. Nothing is at ``url`` unless complete: an object store's multipart upload
    (``part_bytes`` parts) completes or is aborted; a local file is renamed into place (its URL
    must end with the member path). ``before_writing`` runs only when the file is to be written
    (a check of the source, say). Memory stays near the largest tensor slice it handles."""
    layout = file_layout(fp)
    size = layout.size
    if _complete_at(url, size):
        return size, True
    if before_writing is not None:
        before_writing()
    with open_checkpoint(source, checkpoint, cache=cache) as ck:
        if is_local(url):
            path = local_path(url)
            if not path.endswith("/" + fp.path):
                raise CkptError(url, f"a local item URL must end with its member {fp.path}")
            write_file(ck, fp, path[: -len(fp.path) - 1], allow_nonfinite=False)
            return size, False
        fs, path = get_fs(url)
        out = fs.open(path, "wb", block_size=part_bytes)
        try:
            written = write_rank(ck, fp, out.write, layout, allow_nonfinite=False)
            if written != size:
                raise CkptError(url, f"wrote {written} bytes, the plan says {size}")
            out.close()
        except BaseException:
            discard = getattr(out, "discard", None)
            if discard is not None:
                discard()  # aborts the multipart upload: nothing appears at url
                out.closed = True
            raise
    return size, False


def write_work_item_in_place(
    source: str,
    checkpoint: str,
    fp: FilePlan,
    archive: str,
    placement: Placement,
    *,
    cache: RangeCache | str | None = None,
) -> int:
    """The target rank file ``fp`` streamed from ``source`` straight to its place in the
    archive ``archive`` (a local or shared-folder file already of the archive's size, laid out
    by :func:`ckptcore.formats.nemo.archive_layout`): header and data at ``placement``, no
    staged copy. Returns the bytes written. Items writing their members this way, in any
    order, on any machine that sees the file, give the archive one pass would write."""
    layout = file_layout(fp)
    if placement.size != layout.size or placement.rel != fp.path:
        raise CkptError(archive, f"{placement.name} is not laid out for {fp.path}")
    with open_checkpoint(source, checkpoint, cache=cache) as ck:
        member = MemberSource(
            layout.size,
            lambda sink: write_rank(ck, fp, sink, layout, allow_nonfinite=False),
        )
        fd = os.open(local_path(archive), os.O_RDWR)
        try:
            write_member_at(fd, placement, member)
        finally:
            os.close(fd)
    return len(placement.header) + layout.size
