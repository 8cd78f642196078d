"""Assemble a :class:`ckptcore.lineage.LineageRecord` from task results and the run's identity."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from prefect import runtime

from ckptcore import lineage
from ckptcore.api import FetchedCheckpoint, SourceListing
from tasks import settings
from tasks.convert import Packaged, Partition, Verified


@dataclass(frozen=True)
class RemoteRun:
    """A step handed to another deployment: which run did it, where, and the wall time."""

    deployment: str
    flow_run_id: str
    flow_run_name: str
    work_pool: str | None
    seconds: float

    def note(self) -> str:
        pool = f" in work pool {self.work_pool}" if self.work_pool else ""
        return f"repartitioned by {self.deployment} run {self.flow_run_name} ({self.flow_run_id}){pool}"


def _plain(value: Any) -> Any:
    """JSON-safe copy of run parameters (anything odd becomes its string)."""
    return json.loads(json.dumps(value, default=str))


def run_info() -> lineage.RunInfo:
    """The current flow run and deployment, from ``prefect.runtime`` (empty outside a run)."""
    run_id = runtime.flow_run.id
    if run_id is None:
        return lineage.RunInfo()
    flow_name = runtime.flow_run.flow_name
    deployment = runtime.deployment.name if runtime.deployment.id else None
    return lineage.RunInfo(
        flow_name=flow_name,
        flow_run_id=str(run_id),
        flow_run_name=runtime.flow_run.name,
        deployment_name=f"{flow_name}/{deployment}" if deployment else None,
        parameters=_plain(dict(runtime.flow_run.parameters or {})),
    )


def start_lineage(
    listing: SourceListing,
    fetched: FetchedCheckpoint,
    partition: Partition | lineage.Layout,
    destination: str,
    remote: RemoteRun | None = None,
) -> lineage.LineageRecord:
    """The record as it goes into the archive: everything but the output and verify result.

    ``partition``: a :class:`Partition` (its ``seconds`` become the ``repartition`` timing), or
    the layout of a streamed write, timed when it ends. ``remote``: the repartition
    deployment's run, when the step was handed over.
    """
    timings = {"list": round(listing.seconds, 3)}
    if not listing.local and not fetched.in_place:  # downloaded first
        timings["fetch"] = round(fetched.seconds, 3)
    layout = partition
    if isinstance(partition, Partition):
        timings["repartition"] = round(partition.seconds, 3)
        layout = partition.layout
    notes = list(fetched.notes) + [n for n in layout.notes if n not in fetched.notes]
    if remote is not None:
        timings["repartition-handoff"] = round(remote.seconds, 3)  # queue + start + run
        notes.append(remote.note())
    return lineage.LineageRecord(
        source=listing.root,
        checkpoint=listing.checkpoint,
        source_files=list(fetched.files),
        source_digest=fetched.digest,
        **layout.record_fields(),
        destination=destination,
        run=run_info(),
        versions=lineage.collect_versions(),
        settings=settings.current().recorded(),
        timings=timings,
        notes=notes,
    )


def finish_lineage(
    record: lineage.LineageRecord,
    packaged: Packaged,
    verified: Verified | None,
    streamed: bool = False,
) -> lineage.LineageRecord:
    """The record once the ``.nemo`` exists: its digest and size, the verify result.

    ``streamed``: written by ``write-nemo`` (timed as ``write``), not packaged separately.
    Without the digest yet (``packaged.sha256`` None), the output is left for ``upload``."""
    timings = {} if streamed else {"package": packaged.seconds}
    if verified is not None:
        timings["verify"] = verified.seconds
    output = None
    if packaged.sha256 is not None:
        output = lineage.OutputInfo(record.destination, packaged.size_bytes, packaged.sha256)
    return record.completed(
        output=output,
        verify=verified.info if verified is not None else None,
        timings=timings,
    )
