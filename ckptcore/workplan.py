"""Work items: a plan's target rank files as independent jobs, with the bytes each reads and writes.

``work_items(ck, plan)`` gives, per target rank file, the exact source byte ranges it reads (file,
offset, length; merged where adjacent) and the size of the file it writes: JSON-serialisable, so a
scheduler can hand items to different machines. :func:`write_work_item` carries one out where
it runs: it opens the source itself and streams its one rank file to a URL (to write it
straight to its place in the final archive instead, see :mod:`ckptcore.assembly`).
``estimate`` turns items into expected wall times for N workers of a given bandwidth (greedy
longest-first assignment), end to end with the archive assembled in place or staged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ckptcore.engine import file_layout, file_reads, write_file, write_rank
from ckptcore.errors import CkptError
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


def work_items(ck: Checkpoint, plan: Plan, with_ranges: bool = True) -> list[WorkItem]:
    items = []
    for fp in plan.files:
        merged, unknown = file_reads(ck, fp)
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


TRAILER_BYTES = 16 << 10  # lineage.json, as estimated (a record is a few KB)


def flow_bytes(items: list[WorkItem], config_bytes: int = 4096) -> int:
    """Archive bytes the flow's process writes when the workers assemble the ``.nemo`` in an
    ``s3://`` destination (:mod:`ckptcore.assembly`): the config, the tail (rank files too short
    for a part of their own, ``lineage.json``, the end of the archive)."""
    from ckptcore.assembly import assembly_for
    from ckptcore.formats.nemo import CONFIG_NAME

    sizes = {CONFIG_NAME: config_bytes, **{i.path: i.write_bytes for i in items}}
    plan = assembly_for("s3://estimate/model.nemo", sizes, [i.path for i in items])
    return config_bytes + plan.trailer_layout(TRAILER_BYTES)[1] - plan.tail_start


def estimate(items: list[WorkItem], workers: int, gbps_per_worker: float) -> dict:
    """Expected wall times: items assigned longest first to the least-loaded worker; each worker
    moves read + write bytes at ``gbps_per_worker``, and so does the flow's process.

    ``seconds``: the items. ``in_place_seconds``: end to end when the workers write the final
    archive in place (they also upload it; the flow writes only :func:`flow_bytes`).
    ``staged_seconds``: end to end when the items are staged, then packaged and uploaded by the
    flow's process (every output byte through it twice)."""
    loads = [0] * max(1, workers)
    for item in sorted(items, key=lambda i: i.read_bytes + i.write_bytes, reverse=True):
        k = loads.index(min(loads))
        loads[k] += item.read_bytes + item.write_bytes
    rate = gbps_per_worker * 1e9
    seconds = max(loads) / rate
    written = sum(i.write_bytes for i in items)
    tail = flow_bytes(items)
    return {
        "workers": workers,
        "seconds": seconds,
        "busiest_worker_bytes": max(loads),
        "flow_bytes": tail,
        "in_place_seconds": seconds + tail / rate,
        "staged_seconds": seconds + 2 * written / rate,
    }


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
