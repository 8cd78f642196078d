"""The five ways ``convert`` builds its ``.nemo``; each returns a :class:`tasks.publish.Built`
that verify and upload take from there (see the table in :mod:`flows.convert`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from prefect import runtime
from prefect.logging import get_run_logger

from ckptcore.api import SourceListing, cache_location, fetch_location, is_local, is_s3
from ckptcore.errors import CkptError
from flows.assemble_items import run_assembled
from flows.repartition_items import run_mapped
from tasks import settings
from tasks.assemble import archive_pending
from tasks.cache import run_cached
from tasks.convert import (
    Packaged,
    download_partition,
    package,
    partition_is_present,
    partition_location,
    repartition,
    require_same_source,
)
from tasks.handoff import Handoff, finish_repartition, start_repartition
from tasks.items import package_staged, parse_runner
from tasks.leases import hold
from tasks.lineage import start_lineage
from tasks.publish import Built
from tasks.source import source_for_reading
from tasks.stream import write_nemo


@dataclass(frozen=True)
class ConvertJob:
    """A ``convert`` run's parameters, checked, and the route they choose."""

    source: str
    destination: str | None = None
    checkpoint: str = "last"
    target_tp: int | None = None
    target_pp: int | None = None
    precision: str = "keep"
    verify: bool = True
    overwrite: bool = False
    tolerance: float = 1e-5
    scratch_url: str | None = None
    runner: str | None = None
    repartition: str = "auto"
    upload: str = "stream"
    source_read: str = "in-place"
    verify_process: str = "auto"
    assemble: str = "in-place"
    kinds: tuple[str, ...] = ("ptl", "nemo", "nemo-dir")

    def __post_init__(self) -> None:
        for name, allowed in (
            ("repartition", ("auto", "inline", "deployment")),
            ("upload", ("stream", "after")),
            ("source_read", ("in-place", "download")),
            ("verify_process", ("auto", "warm", "inline")),
            ("assemble", ("in-place", "staged")),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise CkptError(None, f"{name}={value!r}: expected {' or '.join(allowed)}")
        runner = (self.runner or "").strip()
        object.__setattr__(self, "runner", None if runner in ("", "inline", "none") else runner)
        if self.runner is not None:
            parse_runner(self.runner)  # a bad runner fails before any work

    def urls(self) -> list[str]:
        """The source and destination (the verify process asks their stores early)."""
        return [u for u in (self.source, self.destination) if u]

    def require_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise CkptError(
                self.source, f"is a {kind} checkpoint; expected {' or '.join(self.kinds)}"
            )

    def hands_off(self) -> bool:
        """Does the repartition deployment repartition (the ``deployment`` route)?"""
        if self.runner is not None or self.repartition == "inline":
            return False
        return self.repartition == "deployment" or runtime.deployment.id is not None

    def start_handoff(self) -> Handoff | None:
        """Create the repartition deployment's run where this job hands off (else None)."""
        if not self.hands_off():
            return None
        return start_repartition(
            self.source, self.checkpoint, self.target_tp, self.target_pp, self.precision,
            self.scratch_url, self.source_read,
        )  # fmt: skip

    def route(self, destination: str, handoff: Handoff | None) -> str:
        if self.runner is not None:
            return "assembled" if self.assemble == "in-place" else "mapped"
        if handoff is not None:
            return "deployment"
        if is_s3(destination) and self.upload == "stream":
            return "stream"
        return "inline"

    def build(self, listing: SourceListing, destination: str, handoff: Handoff | None) -> Built:
        """The ``.nemo`` in the work folder, by this job's route."""
        route = ROUTES[self.route(destination, handoff)]
        return route(self, listing, destination, handoff)


def build_inline(
    job: ConvertJob, listing: SourceListing, destination: str, handoff: Handoff | None
) -> Built:
    """locate-source (or fetch) -> repartition -> package, in this run."""
    work = settings.work_dir()
    fetched = source_for_reading(listing, work, job.source_read)
    location = partition_location(work, fetched, job.target_tp, job.target_pp, job.precision)
    hold(location)  # runs over the same bytes share it
    partition = run_cached(
        repartition, partition_is_present, fetched, job.target_tp, job.target_pp,
        job.precision, location,
    )  # fmt: skip
    record = start_lineage(listing, fetched, partition, destination)
    packaged = package(partition, record, work, _file_name(destination))
    files = [os.path.dirname(packaged.path), partition.url, location]
    return Built(fetched, packaged, record, files + _source_copies(listing, work))


def build_deployment(
    job: ConvertJob, listing: SourceListing, destination: str, handoff: Handoff | None
) -> Built:
    """Wait for the repartition run -> download-partition -> package."""
    assert handoff is not None
    work = settings.work_dir()
    fetched = source_for_reading(listing, work, job.source_read)
    remote = finish_repartition(handoff)
    partition = download_partition(handoff.location, work)
    require_same_source(partition, fetched)
    record = start_lineage(listing, fetched, partition, destination, remote)
    packaged = package(partition, record, work, _file_name(destination))
    files = [os.path.dirname(packaged.path), partition.url, handoff.location]
    return Built(fetched, packaged, record, files + _source_copies(listing, work))


def build_stream(
    job: ConvertJob, listing: SourceListing, destination: str, handoff: Handoff | None
) -> Built:
    """write-nemo: repartition and package in one pass, the upload following the file."""
    work = settings.work_dir()
    fetched = source_for_reading(listing, work, job.source_read)
    written = write_nemo(
        listing, fetched, job.target_tp, job.target_pp, job.precision, destination, work
    )
    files = [os.path.dirname(written.packaged.path), *_source_copies(listing, work)]
    return Built(fetched, written.packaged, written.record, files, written.upload, streamed=True)


def build_mapped(
    job: ConvertJob, listing: SourceListing, destination: str, handoff: Handoff | None
) -> Built:
    """repartition-items on the job's task runner -> package (the staged files streamed in);
    the source is verified where it is (no local copy of it is made)."""
    assert job.runner is not None
    work = settings.work_dir()
    mapped = run_mapped(
        listing, job.target_tp, job.target_pp, job.precision, job.runner, job.scratch_url
    )
    record = start_lineage(listing, mapped.fetched, mapped.partition, destination)
    record = replace(record, notes=[*record.notes, mapped.note()])
    packaged = package_staged(mapped.partition, record, work, _file_name(destination))
    files = [os.path.dirname(packaged.path), mapped.partition.url]
    if mapped.fetched.cache_dir:
        files.append(mapped.fetched.cache_dir)
    staging = mapped.partition.url.rsplit("/", 1)[0]  # a shared folder: this run's items go
    shared = (staging,) if is_local(staging) else ()
    return Built(mapped.fetched, packaged, record, files, shared_roots=shared)


def build_assembled(
    job: ConvertJob, listing: SourceListing, destination: str, handoff: Handoff | None
) -> Built:
    """assemble-items on the job's task runner: the workers write the final archive in place
    and check what they wrote; it waits, uncommitted, for verify and the commit."""
    assert job.runner is not None
    done = run_assembled(
        listing, job.target_tp, job.target_pp, job.precision, destination, job.runner,
        job.verify, job.tolerance,
    )  # fmt: skip
    target = archive_pending(done.target)  # the run's rollback aborts it from here on
    get_run_logger().info("%s; per worker: %s", done.funnel(), done.worker_bytes())
    packaged = Packaged(target.path or destination, done.size_bytes, done.sha256, done.seconds)
    files = _source_copies(listing, settings.work_dir())  # held by this run: let go at the end
    return Built(
        done.fetched, packaged, done.record, files, archive=target, parts=done.parts,
        verified=done.verified,
    )  # fmt: skip


ROUTES = {
    "assembled": build_assembled,
    "mapped": build_mapped,
    "deployment": build_deployment,
    "stream": build_stream,
    "inline": build_inline,
}


def _file_name(destination: str) -> str:
    return destination.rsplit("/", 1)[-1]


def _source_copies(listing: SourceListing, work: str) -> list[str]:
    """A remote source's downloaded files and range cache in the work folder."""
    if listing.local:
        return []
    return [fetch_location(listing, work), cache_location(listing, work)]
