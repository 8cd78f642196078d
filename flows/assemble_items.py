"""``assemble-items``: the workers write the final ``.nemo`` in place, no funnel.

``convert`` runs it as a subflow when its ``runner`` parameter names a task runner and
``assemble="in-place"`` (the default). The plan fixes every member's place in the archive; each
``write-piece`` task, wherever the runner puts it, writes its rank files (and the small members
before them) straight there and checks them against the source; this process writes the tail
(``lineage.json``, the end of the archive); ``check-archive`` runs the logit check on a worker
where the archive is a file. The archive is left uncommitted for ``convert`` to commit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from prefect import flow, runtime, unmapped
from prefect.artifacts import create_table_artifact
from prefect.futures import wait

from ckptcore import lineage
from ckptcore.api import (
    CONFIG_NAME,
    ArchiveTarget,
    Assembly,
    FetchedCheckpoint,
    FilePlan,
    MemberData,
    SourceListing,
    Tail,
    abort_archive,
    assembly_for,
    begin_archive,
    cache_location,
    dump_config,
    headers_only,
    locate_checkpoint,
    open_checkpoint,
    plan_conversion,
    plan_sizes,
    rank_member,
    write_tail,
)
from tasks import settings
from tasks.assemble import ArchiveCheck, PieceReport, check_archive, piece_inputs, write_piece
from tasks.convert import Verified, verified
from tasks.items import make_task_runner, parse_runner, source_objects
from tasks.lineage import run_info, start_lineage


@dataclass(frozen=True)
class Assembled:
    """The archive the workers wrote, complete but not committed: where it is, its parts, the
    lineage record it holds, the checks that ran, and who wrote how many bytes."""

    target: ArchiveTarget
    record: lineage.LineageRecord
    fetched: FetchedCheckpoint
    pieces: tuple[PieceReport, ...]
    tail: Tail
    small_bytes: int  # small members (the config) this process handed to pieces
    verified: Verified | None
    sha256: str | None  # a file archive's, taken where the logit check ran
    seconds: float

    @property
    def parts(self) -> tuple[dict, ...]:
        """Every part of its upload (``s3://``), the tail's last."""
        parts = tuple(part for p in self.pieces for part in p.result.parts)
        return parts + ((self.tail.part,) if self.tail.part is not None else ())

    @property
    def size_bytes(self) -> int:
        return self.tail.size_bytes

    @property
    def flow_bytes(self) -> int:
        """Archive bytes this process produced: the tail, and the small members."""
        return self.tail.written_bytes + self.small_bytes

    def worker_bytes(self) -> dict[str, int]:
        """Archive bytes written per worker."""
        out: dict[str, int] = {}
        for p in self.pieces:
            out[p.worker] = out.get(p.worker, 0) + p.result.written_bytes
        return out

    def note(self, runner: str) -> str:
        return assembled_note(list(self.pieces), runner)

    def funnel(self) -> str:
        share = self.flow_bytes / self.size_bytes if self.size_bytes else 0.0
        return f"{self.flow_bytes:,} of {self.size_bytes:,} bytes ({share:.3%}) from the flow"

    def table(self) -> list[dict]:
        rows = [
            {
                "task": "write-piece",
                "what": ", ".join(p.result.members),
                "worker": p.worker,
                "read_bytes": p.result.read_bytes,
                "write_bytes": p.result.written_bytes,
                "tensors_checked": p.result.tensors_checked,
                "seconds": round(p.seconds, 3),
            }
            for p in self.pieces
        ]
        rows.append(
            {
                "task": "write-tail",
                "what": ", ".join([*self.tail.members, lineage.MEMBER_NAME]),
                "worker": "flow",
                "read_bytes": 0,
                "write_bytes": self.flow_bytes,
                "tensors_checked": 0,
                "seconds": 0.0,
            }
        )
        return rows


def assembled_note(pieces: list[PieceReport], runner: str) -> str:
    """The lineage note of an archive the workers assembled."""
    workers = len({p.worker for p in pieces})
    return f"assembled in place: {len(pieces)} pieces written by {workers} worker(s) on {runner}"


def _verified(
    pieces: list[PieceReport],
    tail: Tail,
    check: ArchiveCheck | None,
    tolerance: float,
    where: str,
) -> Verified:
    """The checks that ran, as one record: every piece's and the tail's, and the logit check's
    if it ran."""
    items = sum(p.result.ranks_checked for p in pieces) + tail.ranks_checked
    tensors = sum(p.result.tensors_checked for p in pieces) + tail.tensors_checked
    seconds = max((p.result.check_seconds for p in pieces), default=0.0)  # they ran side by side
    if check is None:
        info = lineage.VerifyInfo(0.0, tolerance, 0, True, "cpu", "items", items, tensors)
        return Verified(info, seconds)
    logits = verified(check.report, where, check.seconds)
    info = replace(logits.info, method=f"items+{logits.info.method}", items=items, tensors=tensors)
    return Verified(info, seconds + check.seconds)


@flow(name="assemble-items", validate_parameters=False)
def assemble_items(
    listing: SourceListing,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    destination: str,
    runner: str = "threads",
    verify: bool = True,
    tolerance: float = 1e-5,
    run: lineage.RunInfo | None = None,
    cache_dir: str | None = None,
) -> Assembled:
    """Plan here (reading only the source's zip directories and pickles), open the archive, map ``write-piece``
    over its pieces, write the tail, run the logit check on a worker where the archive is a
    file. A failure aborts the archive. ``runner`` only names the runner in the record;
    ``with_options(task_runner=...)`` chooses it. ``run``: the calling run, named in the
    lineage record. ``cache_dir``: a range cache every reader shares (threads beside the flow:
    each source byte is fetched once)."""
    start = time.perf_counter()
    checkpoint = listing.checkpoint or "last"
    fetched = locate_checkpoint(listing, settings.work_dir())
    with headers_only(), open_checkpoint(listing.root, checkpoint, cache=cache_dir) as ck:
        plan = plan_conversion(ck, target_tp, target_pp, precision)
        layout = lineage.Layout.of(ck, plan)
    files = {fp.path: fp for fp in plan.files}
    small = {CONFIG_NAME: dump_config(plan.config)}
    sizes = {CONFIG_NAME: len(small[CONFIG_NAME]), **plan_sizes(plan.files)}
    assembly = assembly_for(
        destination,
        sizes,
        list(files),
        part_bytes=settings.upload_chunk_bytes(),
        min_part=settings.min_part_bytes(),
    )
    record = start_lineage(listing, fetched, layout, destination)
    record = replace(record, run=run or record.run)
    target = begin_archive(
        destination, assembly, metadata=record.object_metadata(),
        checksum=settings.upload_checksum(),
    )  # fmt: skip
    try:
        inputs = piece_inputs(assembly, files, small)
        futures = write_piece.map(
            unmapped(listing.root),
            unmapped(checkpoint),
            unmapped(source_objects(listing)),
            [f for f, _ in inputs],
            [s for _, s in inputs],
            list(assembly.pieces),
            unmapped(target),
            unmapped(verify),
            unmapped(cache_dir),
        )
        wait(futures)
        pieces = [f.result() for f in futures]
        note = assembled_note(pieces, runner)
        if runtime.flow_run.id:
            note += f" (run {runtime.flow_run.name}, {runtime.flow_run.id})"
        record = replace(record, notes=[*record.notes, note])
        tail = _write_tail(assembly, target, record, listing, cache_dir, files, small, verify)
        check = None
        if verify and target.path is not None:  # a file: readable before it is committed
            check = check_archive.submit(fetched.open_url, target, tolerance).result()
        checked = _verified(pieces, tail, check, tolerance, destination) if verify else None
    except BaseException:  # a failed piece, tail or check: nothing appears at the destination
        abort_archive(target)
        raise
    handed = sum(len(small[r]) for p in pieces for r in p.result.members if r in small)
    done = Assembled(
        target, record, fetched, tuple(pieces), tail, handed, checked,
        check.sha256 if check is not None else None, time.perf_counter() - start,
    )  # fmt: skip
    run_id = runtime.flow_run.id
    description = f"{done.note(runner)}; {done.funnel()}"
    description += f" (run {runtime.flow_run.name})" if run_id else ""
    create_table_artifact(done.table(), key="work-items", description=description)
    return done


def _write_tail(
    assembly: Assembly,
    target: ArchiveTarget,
    record: lineage.LineageRecord,
    listing: SourceListing,
    cache_dir: str | None,
    files: dict[str, FilePlan],
    small: dict[str, bytes],
    verify: bool,
) -> Tail:
    """The tail from this process: ``lineage.json``, the end of the archive, and the rank files
    too short for a part of their own (the source is opened only for those)."""
    trailer = record.to_json().encode()
    checksum = settings.upload_checksum()
    if not any(p.rel in files for p in assembly.tail):
        return write_tail(assembly, target, trailer, small.__getitem__, checksum=checksum)
    with open_checkpoint(listing.root, listing.checkpoint or "last", cache=cache_dir) as ck:

        def produce(rel: str) -> MemberData:
            return small[rel] if rel in small else rank_member(ck, files[rel])

        check = (ck, files) if verify else None
        return write_tail(assembly, target, trailer, produce, checksum=checksum, check=check)


def run_assembled(
    listing: SourceListing,
    target_tp: int | None,
    target_pp: int | None,
    precision: str,
    destination: str,
    runner: str,
    verify: bool,
    tolerance: float,
) -> Assembled:
    """``assemble-items`` as a subflow on the task runner ``runner`` names."""
    spec = parse_runner(runner, settings.runner_workers())
    subflow = assemble_items.with_options(task_runner=make_task_runner(spec))
    # threads share this machine: one range cache for the plan, the pieces and the tail
    work = settings.work_dir()
    cache = None if listing.local or spec.kind != "threads" else cache_location(listing, work)
    return subflow(
        listing, target_tp, target_pp, precision, destination, spec.describe(), verify, tolerance,
        run_info(), cache,
    )  # fmt: skip
