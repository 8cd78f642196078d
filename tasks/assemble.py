"""The final ``.nemo`` written by the workers: thin tasks over :mod:`ckptcore.assembly`.

The ``assemble-items`` flow opens the destination's archive (an ``s3://`` multipart upload, or a
work file beside a local or shared-folder destination); ``write-piece`` runs where the task runner puts it (threads, Dask, Ray): it opens the source
itself, writes its piece (rank files, and the small members that ride with them) straight to
its place in the archive, reads what it wrote back and compares it with the source. The flow's
process writes only the tail (``lineage.json`` and the end of the archive, and rank files too
short for a part of their own); ``check-archive`` runs the logit check on a worker where the
archive can be read before it is committed (a file). ``archive-pending`` holds the finished
archive in the run's transaction until ``commit-archive`` makes it visible; a rollback aborts it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NONE
from prefect.logging import get_run_logger
from prefect.transactions import Transaction, get_transaction

from ckptcore import api, lineage
from ckptcore.api import ArchiveTarget, Assembly, FilePlan, Piece, PieceResult
from tasks import settings
from tasks.items import SourceObject, check_unchanged, peak_rss_bytes, worker_identity
from tasks.retry import storage_retries

TARGET_NAME = "archive_target"  # the transaction value naming the open archive


@task(name="archive-pending", cache_policy=NONE)
def archive_pending(target: ArchiveTarget) -> ArchiveTarget:
    """Hold the assembled, uncommitted archive in the run's transaction: a rollback (verify or
    the commit failed) aborts the upload or removes the work file."""
    txn = get_transaction()
    if txn is not None:
        txn.set(TARGET_NAME, target)
    return target


@archive_pending.on_rollback
def abort_pending_archive(txn: Transaction) -> None:
    """The run's transaction rolled back: nothing appears at the destination."""
    target = txn.get(TARGET_NAME, None)
    if target is not None:
        api.abort_archive(target)


@dataclass(frozen=True)
class PieceReport:
    """One written piece, and who wrote it how fast."""

    result: PieceResult
    worker: str
    seconds: float
    started: float  # time.time() when the task began (to line pieces up across workers)
    peak_rss_bytes: int


@task(name="write-piece", cache_policy=NONE, **storage_retries())
def write_piece(
    source: str,
    checkpoint: str,
    objects: tuple[SourceObject, ...],
    files: dict[str, FilePlan],
    small: dict[str, bytes],
    piece: Piece,
    target: ArchiveTarget,
    check: bool = True,
    cache_dir: str | None = None,
) -> PieceReport:
    """Write ``piece`` straight into the archive where this task runs, checking first that the
    source is what the run listed, and after, with ``check``, what it wrote against the
    source. A retry writes the same bytes to the same place again. ``cache_dir``: a range
    cache shared with the flow (threads on its machine)."""
    start, started = time.perf_counter(), time.time()
    result = api.write_piece(
        source,
        checkpoint,
        files,
        small,
        piece,
        target,
        check=check,
        concurrency=settings.upload_concurrency(),
        checksum=settings.upload_checksum(),
        before_writing=lambda: check_unchanged(objects),
        cache=cache_dir,
    )
    report = PieceReport(
        result, worker_identity(), time.perf_counter() - start, started, peak_rss_bytes()
    )
    get_run_logger().info(
        "piece %d (%s): %s bytes written%s in %.2f s on %s",
        piece.index,
        ", ".join(result.members),
        f"{result.written_bytes:,}",
        f", {result.tensors_checked} tensors checked" if result.checked else "",
        report.seconds,
        report.worker,
    )
    return report


@dataclass(frozen=True)
class ArchiveCheck:
    """The logit check of a file archive, and its sha256, taken where the check ran."""

    report: api.VerifyReport
    sha256: str
    worker: str
    seconds: float


@task(name="check-archive", cache_policy=NONE)
def check_archive(source: str, target: ArchiveTarget, tolerance: float) -> ArchiveCheck:
    """Source and the assembled archive (a file, read before it is committed) on the same
    images, and the archive's sha256, on the worker this task lands on."""
    assert target.path is not None
    start = time.perf_counter()
    report = api.verify(source, target.path, tolerance=tolerance, images=settings.verify_images())
    digest = lineage.sha256_file(target.path)
    return ArchiveCheck(report, digest, worker_identity(), time.perf_counter() - start)


def piece_inputs(
    assembly: Assembly, files: dict[str, FilePlan], small: dict[str, bytes]
) -> list[tuple[dict[str, FilePlan], dict[str, bytes]]]:
    """Per piece: the plans of its rank files and the bytes of its small members (only what
    it writes travels to its worker)."""
    out = []
    for piece in assembly.pieces:
        rels = piece.files()
        out.append(
            ({r: files[r] for r in rels if r in files}, {r: small[r] for r in rels if r in small})
        )
    return out
